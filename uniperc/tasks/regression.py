"""Regression of scalar targets or of fields (weather forecasting), with masked (NaN) targets left out."""
from __future__ import annotations

import torch

from .base import Task, detached_scores
from .registry import register_task


@register_task("regression")
class Regression(Task):
    """Mean-squared error on the targets flattened to one vector per sample; metrics MSE, RMSE and MAE overall
    and per target variable (``mse/<name>``, ...). ``output_names`` names either every output or the variables,
    whose outputs are then equal consecutive groups (a forecast of V variables x horizon x H x W flattened
    variable-major, as ``uniperc.modalities.weather`` does). NaN targets (masked grid points, weather's
    ``nan_policy="mask"``) count neither in the loss nor in the metrics. A field target can take a dense head."""

    primary_metric = "mse"
    higher_is_better = False
    heads = ("pooled", "dense")
    grouped_outputs = True

    def loss(self, outputs, labels, label_smoothing=0.0):
        target = labels.float().reshape(outputs.shape)
        valid = torch.isfinite(target)
        # mean over the valid points only; a batch with none gives 0 (and zero gradients), not NaN
        err = torch.where(valid, outputs - target.nan_to_num(0.0, 0.0, 0.0), 0.0)
        return err.pow(2).sum() / valid.sum().clamp(min=1)

    def labels_from(self, outputs):
        return outputs.float()

    def metrics(self, outputs, labels, output_names=None):
        outputs = detached_scores(outputs)
        y = labels.detach().float().cpu().reshape(outputs.shape)
        valid = torch.isfinite(y)
        if not valid.any():
            raise ValueError("regression metrics are undefined: every target in the evaluated set is masked (NaN)")
        err = torch.where(valid, outputs - y.nan_to_num(0.0, 0.0, 0.0), 0.0)
        names = list(output_names) if output_names is not None else [str(i) for i in range(outputs.shape[1])]
        # variable-major groups, e.g. (v horizon h w); each statistic is a mean over the valid points only
        n, v = err.shape[0], len(names)
        groups = [("", err, valid)] + [(f"/{name}", e, m) for name, e, m in zip(
            names, err.reshape(n, v, -1).unbind(1), valid.reshape(n, v, -1).unbind(1))]
        out = {}
        for suffix, e, m in groups:
            count = m.sum().clamp(min=1)
            mse = (e.pow(2).sum() / count).item()
            out.update({f"mse{suffix}": mse, f"rmse{suffix}": mse ** 0.5, f"mae{suffix}": (e.abs().sum() / count).item()})
        return out

    def postprocess(self, prediction, output_names, top_k=3):
        """Per named variable the mean of its outputs (a forecast field has many per variable), and every output."""
        groups = prediction.reshape(len(output_names), -1)
        return {"values": {name: float(g.mean()) for name, g in zip(output_names, groups)},
                "outputs": prediction.tolist()}

    def format_prediction(self, result):
        return ", ".join(f"{k}={v:.4g}" for k, v in result["values"].items())

    def trivial_baselines(self, data, splits):
        from ..baselines import persistence_and_climatology

        return persistence_and_climatology(data, splits, self)

    def baseline_summary(self, title, columns):
        """MSE / RMSE overall and per variable, one line each."""
        metrics = columns[0][1]
        groups = [""] + sorted(k[len("mse/"):] for k in metrics if k.startswith("mse/"))
        lines = [f"{title} vs baselines (MSE / RMSE, normalised units):"]
        for g in groups:
            suffix = f"/{g}" if g else ""
            lines.append(f"  {g or 'all':>10}: " + " | ".join(
                f"{label} {m['mse' + suffix]:.4g} / {m['rmse' + suffix]:.4g}" for label, m in columns))
        return "\n".join(lines)

    def did_not_learn(self, metrics, baselines):
        persistence = baselines.get("persistence", {}).get("mse")
        if persistence is not None and metrics["mse"] >= persistence:
            return f"MSE {metrics['mse']:.4g} is no better than persistence ({persistence:.4g})"
        return None
