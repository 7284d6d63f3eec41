"""Point-cloud modality: a 3-D point set -> multi-view depth (+normal) images ``C' x H x W``.

Pipeline. Loading (once per file, open3d): read ``.ply/.pcd/.xyz`` points or ``.off/.obj/.stl/.ply``
meshes (meshes are sampled uniformly on their surface, ``surface_points`` points, with triangle
normals) -> centre + scale to the unit sphere -> optional voxel down-sampling (``voxel_size``, in
unit-sphere units) -> normals estimated where the file has none (oriented away from the centroid) ->
farthest-point down-sampling to ``num_points``. The raw row stores these points and normals.

Adapter (every access, torch only): training augmentation (random rotation about the ``z`` axis, or a
uniformly random 3-D rotation with ``rotation="so3"``, anisotropic scale 0.8-1.25, jitter sigma 0.01 clipped at 0.05, random drop of up to
``max_dropout`` of the points) -> with ``align="pca"`` (the demo's setting) a turn into the cloud's principal
axes (:func:`principal_axes`) -> re-normalisation to the unit sphere -> orthographic projection onto
``views`` fixed cameras placed on a ring at ``elevation`` degrees (MVCNN's set-up) -> per view a depth
image (1 = nearest to the camera, 0 = background, max-reduced per pixel with
``torch.Tensor.scatter_reduce`` — no torch_scatter) and, for ``normal_mode``: ``"shading"`` one channel
``|n . view|`` of the front-most point, ``"xyz"`` its normal in camera coordinates (3 channels), ``"none"``.
Each point is splatted over a ``(2 splat + 1)^2`` pixel footprint so sparse clouds give closed surfaces.

Layout (``view_layout``): ``"channels"`` (default) stacks the views as channels,
``C' = views x (1 + normal channels)`` (6 x 2 = 12 by default) and one backbone pass sees all views;
``"batch"`` returns ``views x (1 + n) x H x W`` per sample, which the model folds into the batch
(``einops.rearrange(x, "b v c h w -> (b v) c h w")``) and max-pools over views after pooling (MVCNN; the
modality reports its :meth:`~PointCloudModality.views`, :class:`uniperc.multimodal.MultiModalNet` does it).
``projection="points"`` instead returns the raw points as a ``6 x 1 x num_points`` tensor (xyz + normal)
for :class:`LearnedProjection`, the trainable alternative (per-point MLP features max-scattered onto
the view grids, then a 1x1 conv), which is how UniRepLKNet learns its ``3 x 224 x 224`` input: the modality's
stem ``learned_projection`` (:meth:`~PointCloudModality.make_stem`), followed by the backbone's stem.

Sources: ``demo`` = clouds sampled from 10 open3d primitive meshes with random size, scale, rotation,
noise and (half the time) partial occlusion by hidden-point removal from a random viewpoint, written
as ``.ply`` in the ModelNet layout; ``folder`` = ModelNet40 layout ``root/<class>/{train,test}/*.off``
(validation carved from train by a stable hash of the file name); ``hub`` = a ModelNet40 copy on the Hub.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from .base import HubSpec, Modality, split_by_key

POINT_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts", ".off", ".obj", ".stl")
MESH_EXTENSIONS = (".off", ".obj", ".stl", ".ply")
SHAPES = ("arrow", "box", "cone", "cylinder", "icosahedron", "mobius", "octahedron", "sphere", "tetrahedron", "torus")
NORMAL_CHANNELS = {"none": 0, "shading": 1, "xyz": 3}


# --------------------------------------------------------------------------- file reading / preparation
def read_points(path, surface_points: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Points (and normals if known) from a point-cloud or mesh file; meshes are surface-sampled.

    open3d's surface sampler draws from one process-wide generator, so it is re-seeded with ``seed`` right
    before each mesh is sampled: the same file gives the same points on every load, whatever was sampled
    before it in the process.
    """
    import open3d as o3d

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MESH_EXTENSIONS and (suffix != ".ply" or _ply_has_faces(path)):
        mesh = o3d.io.read_triangle_mesh(str(path))
        if len(mesh.triangles) == 0 and suffix == ".off":
            mesh = _read_off_fallback(path)
        if len(mesh.triangles) > 0:
            o3d.utility.random.seed(int(seed))
            pcd = mesh.sample_points_uniformly(int(surface_points), use_triangle_normal=True)
            return np.asarray(pcd.points, np.float32), np.asarray(pcd.normals, np.float32)
    pcd = o3d.io.read_point_cloud(str(path))
    if len(pcd.points) == 0 and suffix in (".off", ".obj", ".stl"):  # a mesh file with vertices only
        verts = np.asarray(o3d.io.read_triangle_mesh(str(path)).vertices, np.float32)
        return verts, None
    pts = np.asarray(pcd.points, np.float32)
    return pts, (np.asarray(pcd.normals, np.float32) if pcd.has_normals() else None)


def _ply_has_faces(path: Path) -> bool:
    """Whether a ``.ply`` header declares faces (a mesh) rather than only vertices (a point cloud)."""
    with open(path, "rb") as f:
        header = f.read(4096).split(b"end_header")[0]
    return any(line.startswith(b"element face") and not line.endswith(b" 0")
               for line in header.replace(b"\r", b"").split(b"\n"))


def _read_off_fallback(path: Path):
    """ModelNet40 has ~1% of ``.off`` files whose header line is glued to the counts ("OFF490 518 0"),
    which open3d rejects; parse those by hand."""
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh()
    try:
        tokens = path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return mesh
    if not tokens or not tokens[0].startswith("OFF"):
        return mesh
    head = tokens[0][3:]
    rest = ([head] if head else []) + tokens[1:]
    try:
        nv, nf = int(rest[0]), int(rest[1])
        verts = np.asarray(rest[3 : 3 + 3 * nv], np.float64).reshape(nv, 3)
        faces = np.asarray(rest[3 + 3 * nv : 3 + 3 * nv + 4 * nf], np.int64).reshape(nf, 4)[:, 1:]
    except (ValueError, IndexError):
        return mesh
    mesh.vertices = o3d.utility.Vector3dVector(verts)
    mesh.triangles = o3d.utility.Vector3iVector(faces)
    return mesh


def validate_points(points: np.ndarray, what: str) -> None:
    """``ValueError`` naming ``what`` for an empty, non-finite, single-point or degenerate cloud."""
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"{what}: expected an N x 3 point array, got shape {tuple(points.shape)}")
    if len(points) == 0:
        raise ValueError(f"{what}: empty point cloud (0 points)")
    if not np.isfinite(points).all():
        raise ValueError(f"{what}: point cloud contains non-finite coordinates (NaN or inf)")
    if len(points) < 2:
        raise ValueError(f"{what}: single-point cloud; at least 2 distinct points are needed")
    if np.ptp(points, axis=0).max() <= 0:
        raise ValueError(f"{what}: all {len(points)} points coincide; the cloud has no extent")


def prepare_cloud(points, normals, cfg: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere -> voxel down-sampling -> normals -> farthest-point sampling (open3d) -> unit sphere.

    Down-sampling averages (voxels) or drops (FPS) points, so the kept cloud is re-centred and re-scaled at
    the end: what is stored always lies in the unit sphere with its farthest point on it.
    """
    import open3d as o3d

    points = np.asarray(points, np.float32)
    validate_points(points, what)
    centre = points.mean(0)
    scale = np.linalg.norm(points - centre, axis=1).max()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector((points - centre) / scale))
    if normals is not None and len(normals) == len(points) and np.isfinite(normals).all():
        pcd.normals = o3d.utility.Vector3dVector(np.asarray(normals, np.float64))
    if cfg["voxel_size"] > 0:
        pcd = pcd.voxel_down_sample(float(cfg["voxel_size"]))
    if not pcd.has_normals():
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.1, max_nn=30))
        pcd.orient_normals_towards_camera_location(np.zeros(3))  # towards the centre ...
        pcd.normals = o3d.utility.Vector3dVector(-np.asarray(pcd.normals))  # ... then flipped outwards
    pcd.normalize_normals()
    if len(pcd.points) > cfg["num_points"]:
        pcd = pcd.farthest_point_down_sample(int(cfg["num_points"]))
    pts, nrm = np.asarray(pcd.points, np.float64), np.asarray(pcd.normals, np.float32)
    validate_points(pts, what)
    pts -= pts.mean(0)
    pts /= np.linalg.norm(pts, axis=1).max()
    return pts.astype(np.float32), nrm


# --------------------------------------------------------------------------- projection
def view_rotations(views: int, elevation_deg: float) -> torch.Tensor:
    """``views x 3 x 3`` world->camera rotations; rows = (right, up, towards-camera) unit vectors.

    Cameras sit on a ring at the given elevation, azimuths ``2 pi k / views`` (MVCNN), looking at the origin.
    """
    el = math.radians(elevation_deg)
    rots = []
    for k in range(views):
        az = 2 * math.pi * k / views
        fwd = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        world_up = torch.tensor([0.0, 0.0, 1.0]) if abs(math.sin(el)) < 0.999 else torch.tensor([0.0, 1.0, 0.0])
        right = torch.linalg.cross(world_up, fwd)
        right = right / right.norm()
        up = torch.linalg.cross(fwd, right)
        rots.append(torch.stack([right, up, fwd]))
    return torch.stack(rots)


def pixel_index(points: torch.Tensor, rot: torch.Tensor, size: tuple[int, int], splat: int):
    """Flat pixel index and depth of every splatted point in every view.

    ``points``: ``B x N x 3`` in the unit sphere. Returns ``idx`` of shape ``B x V x N x k``
    (``k = (2 splat + 1)^2`` footprint pixels) into a ``B*V*H*W + 1`` buffer whose last slot collects
    samples falling outside the image (cheaper than boolean masking), ``depth`` ``B x V x N`` in [0, 1]
    (1 = nearest to the camera) and the camera coordinates ``B x V x N x 3``.
    """
    b, n, _ = points.shape
    v = rot.shape[0]
    h, w = size
    cam = torch.einsum("vij,bnj->bvni", rot.to(points), points)
    col = ((cam[..., 0] + 1) / 2 * (w - 1)).round().long()[..., None]
    row = ((1 - cam[..., 1]) / 2 * (h - 1)).round().long()[..., None]
    depth = ((cam[..., 2] + 1) / 2).clamp(0, 1)
    offs = torch.arange(-splat, splat + 1, device=points.device)
    dr, dc = (t.reshape(-1) for t in torch.meshgrid(offs, offs, indexing="ij"))
    row, col = row + dr, col + dc  # B x V x N x k
    valid = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    base = (torch.arange(b, device=points.device)[:, None] * v + torch.arange(v, device=points.device)) * (h * w)
    idx = base[:, :, None, None] + row * w + col
    idx = torch.where(valid, idx, b * v * h * w)
    return idx, depth, cam


def project_views(
    points: torch.Tensor,
    normals: torch.Tensor,
    rot: torch.Tensor,
    size: tuple[int, int],
    normal_mode: str = "shading",
    splat: int = 1,
) -> torch.Tensor:
    """Depth (+normal) images of a batch of clouds: ``B x N x 3`` -> ``B x V x (1 + n) x H x W``."""
    b = points.shape[0]
    v = rot.shape[0]
    h, w = size
    total = b * v * h * w
    idx, depth, _ = pixel_index(points, rot, size, splat)
    k = idx.shape[-1]
    idx = idx.reshape(-1)
    depth = depth[..., None].expand(-1, -1, -1, k).reshape(-1)
    depth_img = points.new_zeros(total + 1).scatter_reduce(0, idx, depth, reduce="amax", include_self=True)
    channels = [depth_img[:total].view(b, v, 1, h, w)]
    if normal_mode != "none":
        ncam = torch.einsum("vij,bnj->bvni", rot.to(normals), normals)  # B x V x N x 3
        feats = ncam[..., 2:3].abs() if normal_mode == "shading" else ncam
        c = feats.shape[-1]
        feats = feats[..., None, :].expand(-1, -1, -1, k, -1).reshape(-1, c)
        # only the front-most sample(s) of each pixel carry its normal; the rest go to the spare slot
        front_idx = torch.where(depth >= depth_img[idx], idx, total)
        out = points.new_zeros(total + 1, c).scatter_reduce(
            0, front_idx[:, None].expand(-1, c), feats, reduce="mean", include_self=False
        )
        channels.append(rearrange(out[:total], "(b v h w) c -> b v c h w", b=b, v=v, h=h, w=w))
    return torch.cat(channels, dim=2)


class LearnedProjection(nn.Module):
    """Trainable points -> image stem (the learned alternative to fixed depth maps).

    Input ``B x 6 x 1 x N`` (what the adapter returns with ``projection="points"``: xyz + normal).
    A per-point MLP makes ``features`` channels; per view they are max-scattered onto an ``H x W`` grid
    (``scatter_reduce(amax)``, differentiable w.r.t. the winning points), the views are stacked as
    channels and a 1x1 conv mixes them to ``out_chans`` (3 for an ImageNet-style backbone).
    """

    def __init__(self, out_chans: int = 3, image_size: int = 64, views: int = 4, elevation: float = 30.0,
                 features: int = 16, splat: int = 1):
        super().__init__()
        self.size, self.splat = (image_size, image_size), splat
        self.register_buffer("rot", view_rotations(views, elevation), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, features), nn.ReLU())
        self.mix = nn.Conv2d(views * features, out_chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pts = rearrange(x[:, :, 0], "b c n -> b n c")
        b, n, _ = pts.shape
        v, (h, w) = self.rot.shape[0], self.size
        feats = self.mlp(pts)  # B x N x F (>= 0 after ReLU, so 0 is the background)
        idx, _, _ = pixel_index(pts[..., :3], self.rot, self.size, self.splat)
        k, c = idx.shape[-1], feats.shape[-1]
        f = feats[:, None, :, None, :].expand(b, v, n, k, c).reshape(-1, c)
        grid = feats.new_zeros(b * v * h * w + 1, c)
        grid = grid.scatter_reduce(0, idx.reshape(-1, 1).expand(-1, c), f, reduce="amax", include_self=True)[:-1]
        return self.mix(rearrange(grid, "(b v h w) c -> b (v c) h w", b=b, v=v, h=h, w=w))


# one set of camera rotations per (views, elevation), shared read-only by every sample's projection
_fixed_view_rotations = functools.lru_cache(maxsize=8)(view_rotations)


# --------------------------------------------------------------------------- modality
class PointCloudModality(Modality):
    name = "point_cloud"
    task = "classification"
    file_extensions = POINT_EXTENSIONS
    input_field = "points"  # a user's dataset: N x 3 lists (or flat 3N), optionally an N x 3 normals column
    optional_fields = ("normals",)
    stems = ("learned_projection",)  # modalities.point_cloud.stem
    hub = HubSpec(
        name="jxie/modelnet40",
        config=None,
        columns={"inputs": "points", "label": "label"},
        splits={"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
        num_classes=40,
        notes="parquet copy of ModelNet40 point sets (no normals: they are estimated on load); its column "
        "names could not be verified offline — load_hub raises a ValueError listing the real columns "
        "if they differ",
    )

    def default_config(self) -> dict:
        return {
            "num_points": 1024,  # farthest-point sampled at load
            "surface_points": 4096,  # sampled on mesh surfaces before FPS
            "voxel_size": 0.0,  # unit-sphere units; 0 disables
            "image_size": 64,
            "views": 6,
            "elevation": 30.0,
            "normal_mode": "shading",  # "none" | "shading" | "xyz"
            "splat": 1,
            "view_layout": "channels",  # "channels" | "batch"
            "projection": "fixed",  # "fixed" depth maps | "points" for LearnedProjection
            "max_dropout": 0.5,
            "rotation": "z",  # "z": about the up axis (ModelNet is stored upright) | "so3": any 3-D rotation
            "align": "none",  # "none" | "pca": turn each cloud into its principal axes before projecting
            "val_fraction": 0.1,
        }

    def demo_config(self) -> dict:
        """The demo's shapes are stored in uniformly random 3-D orientations, so training rotates in 3-D too
        (rotating about z alone covers a sliver of the poses the test clouds come in), and every cloud is turned
        into its principal axes, so the fixed cameras see an elongated or flat shape from the same sides whatever
        its stored pose."""
        return self.config(rotation="so3", align="pca")

    def validate_config(self, cfg):
        if cfg["normal_mode"] not in NORMAL_CHANNELS:
            raise ValueError(f"point_cloud: normal_mode must be one of {list(NORMAL_CHANNELS)}, got {cfg['normal_mode']!r}")
        if cfg["view_layout"] not in ("channels", "batch"):
            raise ValueError(f"point_cloud: view_layout must be 'channels' or 'batch', got {cfg['view_layout']!r}")
        if cfg["projection"] not in ("fixed", "points"):
            raise ValueError(f"point_cloud: projection must be 'fixed' or 'points', got {cfg['projection']!r}")
        if cfg["rotation"] not in ("z", "so3"):
            raise ValueError(f"point_cloud: rotation must be 'z' or 'so3', got {cfg['rotation']!r}")
        if cfg["align"] not in ("none", "pca"):
            raise ValueError(f"point_cloud: align must be 'none' or 'pca', got {cfg['align']!r}")
        for key in ("num_points", "image_size", "views"):
            if int(cfg[key]) < 1:
                raise ValueError(f"point_cloud: {key} must be >= 1, got {cfg[key]}")

    def stem_for(self, cfg) -> str:
        """Raw points (``projection="points"``) are read by :class:`LearnedProjection`; depth images by the backbone."""
        return "learned_projection" if cfg["projection"] == "points" else "backbone"

    def check_stem(self, stem, cfg, source):
        if stem != self.stem_for(cfg):
            raise ValueError(f"{stem!r} cannot read point_cloud inputs with projection {cfg['projection']!r} "
                             f"(raw points need 'learned_projection', depth images 'backbone'); use "
                             f"{self.stem_for(cfg)!r} or 'auto'")

    def make_stem(self, stem, cfg, backbone_stem):
        """:class:`LearnedProjection` to an RGB-like ``3 x image_size x image_size`` image (UniRepLKNet's input),
        then the backbone's stem on its 3 channels."""
        projection = LearnedProjection(out_chans=3, image_size=int(cfg["image_size"]), views=int(cfg["views"]),
                                       elevation=float(cfg["elevation"]), splat=int(cfg["splat"]))
        return nn.Sequential(projection, backbone_stem(3))

    def views(self, cfg) -> int | None:
        """``view_layout="batch"`` of depth images: ``views`` images per cloud."""
        return int(cfg["views"]) if cfg["view_layout"] == "batch" and cfg["projection"] == "fixed" else None

    def in_chans(self, cfg=None) -> int:
        """Channels of the adapter output; with ``view_layout="batch"`` the channels of *one* view."""
        cfg = self.config(cfg)
        if cfg["projection"] == "points":
            return 6
        per_view = 1 + NORMAL_CHANNELS[cfg["normal_mode"]]
        return per_view * (cfg["views"] if cfg["view_layout"] == "channels" else 1)

    def input_size(self, cfg=None) -> tuple[int, int]:
        cfg = self.config(cfg)
        if cfg["projection"] == "points":
            return (1, cfg["num_points"])
        return (cfg["image_size"], cfg["image_size"])

    def raw_features(self, label_names, cfg):
        import datasets

        return datasets.Features(
            {
                "points": datasets.Array2D(shape=(None, 3), dtype="float32"),
                "normals": datasets.Array2D(shape=(None, 3), dtype="float32"),
                "label": datasets.ClassLabel(names=list(label_names)),
                "path": datasets.Value("string"),
            }
        )

    # ----------------------------------------------------------------- adapter
    def to_input(self, raw, cfg, train):
        what = f"point cloud {raw.get('path') or 'sample'}"
        pts = np.asarray(raw["points"], np.float32)
        validate_points(pts, what)
        nrm = raw.get("normals")
        nrm = np.asarray(nrm, np.float32) if nrm is not None and len(nrm) == len(pts) else np.zeros_like(pts)
        p, nvec = torch.from_numpy(pts), torch.from_numpy(nrm)
        if train:
            p, nvec = _augment(p, nvec, cfg["max_dropout"], cfg["rotation"])
        p = p - p.mean(0)
        if cfg["align"] == "pca":
            p, nvec = principal_axes(p, nvec)
        p = p / p.norm(dim=1).max().clamp_min(1e-8)
        if cfg["projection"] == "points":
            keep = torch.arange(cfg["num_points"]) % len(p)  # fixed N: repeat points of smaller clouds
            return rearrange(torch.cat([p, nvec], 1)[keep], "n c -> c 1 n").contiguous()
        rot = _fixed_view_rotations(cfg["views"], float(cfg["elevation"]))
        size = (cfg["image_size"], cfg["image_size"])
        img = project_views(p[None], nvec[None], rot, size, cfg["normal_mode"], cfg["splat"])[0]
        if cfg["view_layout"] == "channels":
            return rearrange(img, "v c h w -> (v c) h w").contiguous()
        return img

    def raw_from_file(self, path, cfg):
        what = f"point cloud file {str(path)!r}"
        pts, nrm = read_points(path, cfg["surface_points"])
        pts, nrm = prepare_cloud(pts, nrm, cfg, what)
        return {"points": pts, "normals": nrm, "path": str(path)}

    # ----------------------------------------------------------------- sources
    def load_folder(self, path, cfg, seed=0, num_proc=None):
        """ModelNet40 layout: ``root/<class>/{train,test}/*.off`` (any supported extension)."""
        import datasets

        path = Path(path)
        labels = sorted(p.name for p in path.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))
        if not labels:
            raise ValueError(f"point_cloud: folder {str(path)!r} has no <class>/train|test subfolders (ModelNet layout)")
        rows = {"train": [], "test": []}
        for y, label in enumerate(labels):
            for split in rows:
                d = path / label / split
                if d.is_dir():
                    rows[split] += [(str(f), y) for f in sorted(d.iterdir()) if f.suffix.lower() in POINT_EXTENSIONS]
        if not rows["train"] or not rows["test"]:
            raise ValueError(f"point_cloud: folder {str(path)!r} needs files under both train/ and test/")
        assign = split_by_key([Path(f).stem for f, _ in rows["train"]], (cfg["val_fraction"], 0.0), seed)
        splits = {
            "train": [r for r, s in zip(rows["train"], assign) if s == "train"],
            "validation": [r for r, s in zip(rows["train"], assign) if s == "validation"],
            "test": rows["test"],
        }
        feats = self.raw_features(labels, cfg)
        out = {}
        for split, items in splits.items():
            ds = datasets.Dataset.from_dict({"path": [f for f, _ in items], "label": [y for _, y in items]})
            out[split] = ds.map(
                _prepare_batch, batched=True, batch_size=32, fn_kwargs={"cfg": cfg}, features=feats,
                num_proc=num_proc, desc=f"point_cloud {split}",
            )
        return datasets.DatasetDict(out)

    def from_table(self, ds, spec, cfg, label_names=None):
        """Point lists from a table (the Hub's or a user's) -> prepared clouds, as files are prepared at load."""
        ds = self.rename_table(ds, spec)
        names = label_names if label_names is not None else ds.features["label"].names
        return ds.map(_prepare_table_batch, batched=True, with_indices=True, fn_kwargs={"cfg": cfg},
                      features=self.raw_features(names, cfg), remove_columns=ds.column_names)

    def make_demo(self, root, seed: int = 0, n_per_class: int = 40, n_points: int = 2048, test_fraction: float = 0.2):
        """``n_per_class`` clouds per primitive shape (10 shapes) as ``.ply`` with normals, ModelNet layout."""
        import open3d as o3d

        root = Path(root)
        rng = np.random.default_rng(seed)
        o3d.utility.random.seed(seed)  # open3d's own sampler (surface sampling) must be seeded too
        n_test = max(1, round(n_per_class * test_fraction))
        for shape in SHAPES:
            for i in range(n_per_class):
                pcd = _demo_cloud(shape, rng, n_points)
                split = "test" if i >= n_per_class - n_test else "train"
                out = root / shape / split / f"{shape}_{i:04d}.ply"
                out.parent.mkdir(parents=True, exist_ok=True)
                o3d.io.write_point_cloud(str(out), pcd, write_ascii=False)
        return root


def _prepare_batch(batch, cfg):
    pts, nrms = [], []
    for f in batch["path"]:
        p, n = read_points(f, cfg["surface_points"])
        p, n = prepare_cloud(p, n, cfg, f"point cloud file {f!r}")
        pts.append(p)
        nrms.append(n)
    return {"points": pts, "normals": nrms, "path": batch["path"], "label": batch["label"]}


def _prepare_table_batch(batch, indices, cfg):
    """Normals come from a ``normals`` column when the table has one, else :func:`prepare_cloud` estimates them."""
    pts, nrms = [], []
    normals = batch.get("normals") or [None] * len(indices)
    for i, p, n in zip(indices, batch["points"], normals):
        what = f"point cloud in row {i} of the table"
        p = np.asarray(p, np.float32)
        if p.size % 3:
            raise ValueError(f"{what}: {p.size} values do not make N x 3 points")
        n = None if n is None else np.asarray(n, np.float32).reshape(-1, 3)
        p, n = prepare_cloud(p.reshape(-1, 3), n, cfg, what)
        pts.append(p)
        nrms.append(n)
    return {"points": pts, "normals": nrms, "path": [""] * len(pts), "label": batch["label"]}


def random_rotation(kind: str) -> torch.Tensor:
    """A random 3 x 3 rotation: about z (``"z"``) or uniform over SO(3) (``"so3"``, QR of a Gaussian matrix)."""
    if kind == "so3":
        q, r = torch.linalg.qr(torch.randn(3, 3))
        q = q * torch.sign(torch.diagonal(r))  # makes the factorisation unique, hence Haar-uniform
        if torch.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    theta = float(torch.rand(()) * 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def principal_axes(p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A centred cloud (and its normals) in the frame of its principal axes, largest variance first, each axis
    pointing to the side where the cloud has its longer tail (sign of the third moment: a cone's tip).

    The frame may be a reflection of the stored pose; no shape class here depends on handedness. Where two
    variances are equal (a cylinder's cross-section, a cube, a sphere) those axes are arbitrary within their
    plane, which the training rotations cover.
    """
    _, vectors = torch.linalg.eigh(p.T @ p)  # ascending eigenvalues
    axes = vectors.flip(1)
    sign = torch.sign(((p @ axes) ** 3).sum(0))
    axes = axes * torch.where(sign == 0, torch.ones_like(sign), sign)
    return p @ axes, n @ axes


def _augment(p: torch.Tensor, n: torch.Tensor, max_dropout: float, rotation: str = "z"):
    """Rotation, anisotropic scale, clipped jitter and random point drop (standard ModelNet recipe)."""
    rot = random_rotation(rotation)
    scale = torch.empty(3).uniform_(0.8, 1.25)
    p = (p @ rot.T) * scale
    n = (n @ rot.T) / scale  # normals transform with the inverse transpose
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-8)
    p = p + (0.01 * torch.randn_like(p)).clamp(-0.05, 0.05)
    if max_dropout > 0 and len(p) > 2:
        keep = torch.rand(len(p)) >= float(torch.rand(()) * max_dropout)
        keep[:2] = True  # never below two points
        p, n = p[keep], n[keep]
    return p, n


def _demo_mesh(shape: str, rng: np.random.Generator):
    import open3d as o3d

    g = o3d.geometry.TriangleMesh
    u = rng.uniform
    if shape == "box":
        mesh = g.create_box(u(0.5, 1.5), u(0.5, 1.5), u(0.5, 1.5))
    elif shape == "sphere":
        mesh = g.create_sphere(radius=1.0, resolution=24)
    elif shape == "cylinder":
        mesh = g.create_cylinder(radius=u(0.3, 0.6), height=u(1.0, 2.0))
    elif shape == "cone":
        mesh = g.create_cone(radius=u(0.4, 0.8), height=u(1.0, 2.0))
    elif shape == "torus":
        mesh = g.create_torus(torus_radius=1.0, tube_radius=u(0.2, 0.45))
    elif shape == "arrow":
        mesh = g.create_arrow(cylinder_radius=u(0.08, 0.15), cone_radius=u(0.2, 0.3),
                              cylinder_height=u(0.8, 1.2), cone_height=u(0.3, 0.6))
    elif shape == "icosahedron":
        mesh = g.create_icosahedron(radius=1.0)
    elif shape == "octahedron":
        mesh = g.create_octahedron(radius=1.0)
    elif shape == "tetrahedron":
        mesh = g.create_tetrahedron(radius=1.0)
    elif shape == "mobius":
        mesh = g.create_mobius(length_split=80, width_split=10, twists=1, width=u(0.5, 1.0))
    else:
        raise ValueError(f"point_cloud demo: unknown shape {shape!r}")
    return mesh.translate(-mesh.get_center())


def _demo_cloud(shape: str, rng: np.random.Generator, n_points: int):
    """Surface samples of a random instance of ``shape``: scale, rotation, noise, maybe occlusion."""
    import open3d as o3d

    mesh = _demo_mesh(shape, rng)
    mesh.scale(rng.uniform(0.5, 2.0), center=np.zeros(3))
    mesh.rotate(o3d.geometry.get_rotation_matrix_from_xyz(rng.uniform(-math.pi, math.pi, 3)), center=np.zeros(3))
    pcd = mesh.sample_points_uniformly(2 * n_points, use_triangle_normal=True)
    pts = np.asarray(pcd.points)
    extent = np.linalg.norm(pts, axis=1).max()
    pcd.points = o3d.utility.Vector3dVector(pts + rng.normal(0, 0.01 * extent, pts.shape))
    if rng.random() < 0.5:  # partial scan: keep what a camera at a random direction sees
        d = rng.normal(size=3)
        cam = d / np.linalg.norm(d) * 3 * extent
        _, visible = pcd.hidden_point_removal(cam, radius=300 * extent)
        if len(visible) >= n_points // 4:
            pcd = pcd.select_by_index(visible)
    if len(pcd.points) > n_points:
        pcd = pcd.select_by_index(np.sort(rng.choice(len(pcd.points), n_points, replace=False)).tolist())
    return pcd


MODALITY = PointCloudModality()
