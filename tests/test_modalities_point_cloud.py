"""Point-cloud modality: projection maths, learned projection, ModelNet layout, demo shapes, bad clouds."""
from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch

import uniperc.modalities as modalities
from uniperc.modalities.point_cloud import SHAPES, LearnedProjection, project_views, view_rotations

m = modalities.get("point_cloud")
SMALL = {"image_size": 16, "views": 3, "num_points": 256, "surface_points": 512}


def test_depth_keeps_the_nearest_point_and_shading_its_normal():
    rot = view_rotations(1, 0.0)  # camera on +x, looking at the origin
    fwd = rot[0, 2]
    pts = torch.stack([0.8 * fwd, -0.5 * fwd])[None]  # same pixel (image centre), different depth
    nrm = torch.stack([fwd, torch.tensor([0.0, 0.0, 1.0])])[None]
    img = project_views(pts, nrm, rot, (9, 9), "shading", splat=0)[0, 0]
    assert img.shape == (2, 9, 9)
    assert img[0, 4, 4].item() == pytest.approx((0.8 + 1) / 2)  # nearer point wins (amax)
    assert img[1, 4, 4].item() == pytest.approx(1.0)  # its normal faces the camera
    assert img[0].count_nonzero() == 1  # background stays 0
    # a point right of centre (camera frame) lands right of the centre column
    right = rot[0, 0]
    img2 = project_views((0.5 * right)[None, None], nrm[:, :1], rot, (9, 9), "none", splat=0)[0, 0, 0]
    assert img2.nonzero().tolist() == [[4, 6]]


def test_in_chans_matches_adapter_output_for_each_layout():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(300, 3)).astype(np.float32)
    raw = {"points": p, "normals": p / np.linalg.norm(p, axis=1, keepdims=True)}
    for over in ({}, {"normal_mode": "xyz"}, {"normal_mode": "none", "views": 4}, {"view_layout": "batch"},
                 {"projection": "points"}):
        cfg = m.config(SMALL, **over)
        x = m.adapter(cfg, train=True)(raw)
        if cfg["view_layout"] == "batch" and cfg["projection"] == "fixed":
            assert x.shape == (cfg["views"], m.in_chans(cfg), *m.input_size(cfg))
        else:
            assert x.shape == (m.in_chans(cfg), *m.input_size(cfg)), over
    assert m.in_chans(m.config(SMALL, normal_mode="xyz")) == 3 * 4


def test_learned_projection_is_trainable():
    proj = LearnedProjection(out_chans=3, image_size=12, views=2, features=4)
    x = torch.randn(2, 6, 1, 50)
    y = proj(x)
    assert y.shape == (2, 3, 12, 12)
    y.square().mean().backward()
    assert proj.mlp[0].weight.grad.abs().sum() > 0 and proj.mix.weight.grad.abs().sum() > 0


def test_bad_clouds_raise_naming_the_sample(tmp_path):
    cfg = m.config(SMALL)
    for pts, msg in ((np.zeros((0, 3)), "empty"), (np.array([[0.0, 0, 0], [np.nan, 0, 0]]), "non-finite"),
                     (np.ones((1, 3)), "single-point"), (np.ones((5, 3)), "coincide")):
        with pytest.raises(ValueError, match=msg):
            m.to_input({"points": pts, "normals": None, "path": "cloud_7.ply"}, cfg, False)
    f = tmp_path / "empty.xyz"
    f.write_text("")
    with pytest.raises(ValueError, match="empty.xyz.*empty"):
        m.read_file(f, SMALL)


def test_file_formats_and_modelnet_layout(tmp_path):
    box = o3d.geometry.TriangleMesh.create_box(1, 2, 3)
    sphere = o3d.geometry.TriangleMesh.create_sphere(1.0)
    for cls, mesh in (("box", box), ("sphere", sphere)):
        for split, n in (("train", 6), ("test", 2)):
            d = tmp_path / "mn" / cls / split
            d.mkdir(parents=True)
            for i in range(n):
                o3d.io.write_triangle_mesh(str(d / f"{cls}_{i:04d}.off"), mesh)
    dsd = m.load("folder", path=tmp_path / "mn", cfg={**SMALL, "val_fraction": 0.3})
    assert m.label_names(dsd) == ["box", "sphere"] and len(dsd["test"]) == 4
    assert len(dsd["train"]) + len(dsd["validation"]) == 12 and len(dsd["validation"]) > 0
    raw = dsd["train"].with_format("numpy")[0]
    assert raw["points"].shape == (256, 3)  # farthest-point sampled
    assert np.abs(np.linalg.norm(raw["points"], axis=1).max() - 1) < 1e-5  # unit sphere
    assert dsd["test"][0]["inputs"].shape == (m.in_chans(SMALL), 16, 16)
    # point files: .xyz without normals (estimated) and .pcd with them
    pcd = sphere.sample_points_uniformly(400)
    o3d.io.write_point_cloud(str(tmp_path / "s.xyz"), pcd)
    pcd.normals = o3d.utility.Vector3dVector(np.asarray(pcd.points))
    o3d.io.write_point_cloud(str(tmp_path / "s.pcd"), pcd)
    for name in ("s.xyz", "s.pcd"):
        raw = m.raw_from_file(tmp_path / name, m.config(SMALL))
        n = raw["normals"]
        assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-3)
        outward = (n * raw["points"]).sum(1) > 0  # sphere: oriented away from the centre
        assert outward.mean() > 0.95, name


def test_mesh_loading_is_deterministic_whatever_ran_before(tmp_path):
    f = tmp_path / "torus.off"
    o3d.io.write_triangle_mesh(str(f), o3d.geometry.TriangleMesh.create_torus())
    cfg = m.config(SMALL)
    first = m.raw_from_file(f, cfg)["points"]
    o3d.geometry.TriangleMesh.create_sphere().sample_points_uniformly(100)  # moves open3d's global generator
    again = m.raw_from_file(f, cfg)["points"]
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.linalg.norm(first, axis=1).max() - 1) < 1e-5 and np.abs(first.mean(0)).max() < 1e-5


def test_modelnet_off_with_glued_header(tmp_path):
    f = tmp_path / "chair_0001.off"  # ModelNet40's known defect: "OFF" glued to the counts
    f.write_text("OFF4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n")
    x = m.read_file(f, SMALL)
    assert x.shape == (m.in_chans(SMALL), 16, 16) and x[0].count_nonzero() > 10


def test_demo_shapes_deterministic_and_partial(tmp_path):
    a = m.make_demo(tmp_path / "a", seed=1, n_per_class=2, n_points=300)
    b = m.make_demo(tmp_path / "b", seed=1, n_per_class=2, n_points=300)
    assert sorted(p.name for p in a.iterdir()) == sorted(SHAPES) and len(SHAPES) >= 8
    fa = sorted(a.rglob("*.ply"))
    assert len(fa) == 20 and all((b / f.relative_to(a)).read_bytes() == f.read_bytes() for f in fa)
    sizes = [len(o3d.io.read_point_cloud(str(f)).points) for f in fa]
    assert max(sizes) <= 300 and min(sizes) >= 75
    assert o3d.io.read_point_cloud(str(fa[0])).has_normals()
    dsd = m.load("demo", cfg=SMALL, cache_dir=tmp_path / "cache", n_per_class=3, n_points=300)
    assert m.num_outputs(dsd) == 10 and dsd["train"][0]["inputs"].shape == (m.in_chans(SMALL), 16, 16)


def test_hub_spec_names_modelnet40():
    spec = m.hub_spec()
    assert spec.name == "jxie/modelnet40" and spec.num_classes == 40 and spec.columns["label"] == "label"


def test_voxel_down_sampling_thins_dense_clouds():
    from uniperc.modalities.point_cloud import prepare_cloud

    rng = np.random.default_rng(0)
    p = rng.normal(size=(4000, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)  # dense unit sphere
    cfg = m.config(num_points=4000)
    full, _ = prepare_cloud(p, None, cfg, "dense")
    thin, normals = prepare_cloud(p, None, m.config(num_points=4000, voxel_size=0.2), "dense")
    assert len(full) == 4000 and 100 < len(thin) < 1000 and normals.shape == thin.shape


def test_so3_rotation_is_a_rotation_and_leaves_the_z_axis():
    from uniperc.modalities.point_cloud import random_rotation

    torch.manual_seed(0)
    tilts = []
    for kind in ("z", "so3"):
        for _ in range(20):
            r = random_rotation(kind)
            assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-5) and torch.det(r) > 0.999
            tilts.append((kind, float(r[2, 2])))
    assert all(abs(t - 1) < 1e-6 for k, t in tilts if k == "z")  # z rotations keep the up axis
    assert min(t for k, t in tilts if k == "so3") < 0.5  # 3-D rotations tip it over
    assert m.demo_config()["rotation"] == "so3" and m.default_config()["rotation"] == "z"
    with pytest.raises(ValueError, match="rotation"):
        m.config(rotation="xyz")


def test_principal_axes_make_the_projection_independent_of_the_stored_pose():
    from uniperc.modalities.point_cloud import principal_axes, random_rotation

    torch.manual_seed(0)
    p = torch.randn(600, 3) * torch.tensor([2.0, 1.0, 0.4])
    p[:, 0] += 0.6 * p[:, 0].abs()  # a longer tail on one side fixes the first axis' sign
    p = p - p.mean(0)
    n = torch.nn.functional.normalize(torch.randn(600, 3), dim=1)
    ref, ref_n = principal_axes(p, n)
    assert torch.allclose(ref.var(0), ref.var(0).sort(descending=True).values)  # largest variance first
    assert ((ref[:, 0] ** 3).sum() > 0) and torch.allclose(ref.norm(dim=1), p.norm(dim=1), atol=1e-5)
    cfg = m.config(align="pca", image_size=16, max_dropout=0.0)
    raw = {"points": p.numpy(), "normals": n.numpy()}
    image = m.to_input(raw, cfg, train=False)
    for _ in range(5):
        r = random_rotation("so3")
        turned, turned_n = principal_axes(p @ r.T, n @ r.T)
        assert torch.allclose(turned, ref, atol=1e-4) and torch.allclose(turned_n, ref_n, atol=1e-4)
        rotated = {"points": (p @ r.T).numpy(), "normals": (n @ r.T).numpy()}
        # the same picture up to float rounding of the depths; unaligned pictures differ
        assert (m.to_input(rotated, cfg, train=False) - image).abs().mean() < 1e-4
        unaligned = m.config(align="none", image_size=16)
        assert (m.to_input(rotated, unaligned, train=False) - m.to_input(raw, unaligned, train=False)).abs().mean() > 0.05
    assert m.demo_config()["align"] == "pca" and m.default_config()["align"] == "none"
    with pytest.raises(ValueError, match="align"):
        m.config(align="ica")
