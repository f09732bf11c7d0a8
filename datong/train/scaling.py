"""Scaling-law fits for a sweep: ``datong fit SWEEP_DIR``.

Three laws, in the form of Hoffmann et al. (2022), with N parameters and D
training tokens:

    L(N)    = E + A N^-alpha            (each size at its largest token budget)
    L(D)    = E + B D^-beta             (each budget at the largest size)
    L(N, D) = E + A N^-alpha + B D^-beta   (every point)

Each is fitted as their "approach 3" is: minimise the Huber loss (delta
1e-3) between the log of the predicted and the log of the measured loss,
over ``log E, log A, log B, alpha, beta``, with BFGS from several starts
(on a grid of exponents, E, A, B by non-negative least squares), keeping the
best. 95% intervals come from a bootstrap: resample the points with
replacement, refit (from the full fit and the resample's own starts), take
the 2.5 and 97.5 percentiles. A prediction's interval also resamples the
fit's residuals, so it covers the scatter of a single run, not only the
uncertainty of the constants.

Compute: C = 6 N D (forward + backward). Minimising L(N, C / 6N) over N
gives the compute-optimal ``N_opt = G (C/6)^(beta/(alpha+beta))`` and
``D_opt = (C/6)^(alpha/(alpha+beta)) / G`` with
``G = (alpha A / (beta B))^(1/(alpha+beta))``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

HUBER_DELTA = 1e-3
LAWS = {"N": ("E", "A", "alpha"), "D": ("E", "B", "beta"),
        "ND": ("E", "A", "alpha", "B", "beta")}


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, law: str):
  """The log of each term of the law, [terms, points], and d term / d theta."""
  ones, zeros = np.ones_like(log_n), np.zeros_like(log_n)
  if law == "N":
    e, a, alpha = theta
    terms = [e + zeros, a - alpha * log_n]
    grads = [[ones, zeros], [zeros, ones], [zeros, -log_n]]
  elif law == "D":
    e, b, beta = theta
    terms = [e + zeros, b - beta * log_d]
    grads = [[ones, zeros], [zeros, ones], [zeros, -log_d]]
  else:
    e, a, alpha, b, beta = theta
    terms = [e + zeros, a - alpha * log_n, b - beta * log_d]
    grads = [[ones, zeros, zeros], [zeros, ones, zeros], [zeros, -log_n, zeros],
             [zeros, zeros, ones], [zeros, zeros, -log_d]]
  return np.stack(terms), np.array(grads)  # grads: [params, terms, points]


def _log_predict(theta, log_n, log_d, law):
  terms, _ = _terms(np.asarray(theta, float), log_n, log_d, law)
  top = terms.max(0)
  return top + np.log(np.exp(terms - top).sum(0))


def _objective(theta, log_n, log_d, log_l, law, weights):
  terms, grads = _terms(theta, log_n, log_d, law)
  top = terms.max(0)
  w = np.exp(terms - top)
  total = w.sum(0)
  residual = top + np.log(total) - log_l
  soft = w / total  # d logsumexp / d term
  small = np.abs(residual) <= HUBER_DELTA
  huber = np.where(small, 0.5 * residual ** 2,
                   HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
  dres = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) * weights
  grad = np.einsum("p,ktp,tp->k", dres, grads, soft)
  # Scaled by 1 / delta (same minimiser): the raw values are so small that
  # the optimizer would take its first gradient for convergence.
  return float(np.sum(huber * weights)) / HUBER_DELTA, grad / HUBER_DELTA


def _linear_starts(law, log_n, log_d, log_l, weights, keep: int, size: int = 24) -> np.ndarray:
  """Starting points: on a grid of exponents the law is linear in E, A, B,
  so each grid point gets them by non-negative least squares on the relative
  error; the ``keep`` best (by the Huber objective) are returned as
  ``log E, log A, alpha, ...``."""
  from scipy.optimize import nnls  # pylint: disable=import-outside-toplevel
  loss = np.exp(log_l)
  exps = np.linspace(0.05, 1.5, size)
  pairs = ([(a, b) for a in exps for b in exps] if law == "ND" else [(a, None) for a in exps])
  root_w = np.sqrt(weights)
  floor = 1e-6 * float(loss.min())
  found = []
  for a, b in pairs:
    if law == "ND":
      cols = [np.ones_like(loss), np.exp(-a * log_n), np.exp(-b * log_d)]
    else:
      cols = [np.ones_like(loss), np.exp(-a * (log_n if law == "N" else log_d))]
    design = np.stack(cols, 1) / loss[:, None] * root_w[:, None]
    coef, _ = nnls(design, root_w)  # minimises sum w (pred / L - 1)^2
    coef = np.maximum(coef, floor)
    theta = ([math.log(coef[0]), math.log(coef[1]), a] +
             ([math.log(coef[2]), b] if law == "ND" else []))
    theta = np.array(theta)
    found.append((_objective(theta, log_n, log_d, log_l, law, weights)[0], theta))
  found.sort(key=lambda t: t[0])
  return np.array([x for _, x in found[:keep]])


def _valid(theta, law) -> bool:
  """Finite, exponents in [0, 5] and coefficients below e^50: BFGS is
  unbounded, and on a few points (a bootstrap resample) it can run off."""
  exps = [v for name, v in zip(LAWS[law], theta) if name in ("alpha", "beta")]
  coefs = [v for name, v in zip(LAWS[law], theta) if name in ("E", "A", "B")]
  return bool(np.all(np.isfinite(theta)) and all(0.0 <= e <= 5.0 for e in exps)
              and all(abs(c) < 50.0 for c in coefs))


def _minimize(starts, log_n, log_d, log_l, law, weights):
  """BFGS from each start; [(objective, theta)] best first, only valid
  results (a start itself stays a candidate). scipy's L-BFGS-B costs ~10 ms
  per iteration in 1.17, BFGS ~0.5 ms; with five constants the dense Hessian
  estimate is free."""
  from scipy.optimize import minimize  # pylint: disable=import-outside-toplevel
  results = []
  for x0 in starts:
    if _valid(x0, law):
      results.append((_objective(x0, log_n, log_d, log_l, law, weights)[0], np.asarray(x0)))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
      r = minimize(_objective, x0, args=(log_n, log_d, log_l, law, weights), jac=True,
                   method="BFGS", options={"maxiter": 1000, "gtol": 1e-9})
    if _valid(r.x, law) and np.isfinite(r.fun):
      results.append((float(r.fun), r.x))
  results.sort(key=lambda t: t[0])
  return results


@dataclasses.dataclass
class Fit:
  law: str
  theta: np.ndarray  # log E, log A, alpha, (log B, beta)
  boot: np.ndarray  # [samples, params]
  residuals: np.ndarray  # log measured - log predicted, per point
  points: int

  def constants(self, theta=None) -> dict[str, float]:
    theta = self.theta if theta is None else theta
    return {name: float(math.exp(v) if name in ("E", "A", "B") else v)
            for name, v in zip(LAWS[self.law], theta)}

  def intervals(self) -> dict[str, tuple[float, float]]:
    values = [self.constants(t) for t in self.boot]
    return {k: (float(np.percentile([v[k] for v in values], 2.5)),
                float(np.percentile([v[k] for v in values], 97.5))) for k in LAWS[self.law]}

  def predict(self, n=None, d=None, theta=None) -> np.ndarray:
    n = np.atleast_1d(np.asarray(1.0 if n is None else n, float))
    d = np.atleast_1d(np.asarray(1.0 if d is None else d, float))
    n, d = np.broadcast_arrays(n, d)
    theta = self.theta if theta is None else theta
    return np.exp(_log_predict(theta, np.log(n), np.log(d), self.law))

  def predict_interval(self, n=None, d=None, seed: int = 0) -> tuple[float, float, float]:
    """The prediction and its 95% interval (constants' bootstrap x residual scatter)."""
    rng = np.random.default_rng(seed)
    samples = np.array([self.predict(n, d, t)[0] for t in self.boot])
    scatter = rng.choice(self.residuals, size=len(samples)) if len(self.residuals) else 0.0
    samples = samples * np.exp(scatter)
    return (float(self.predict(n, d)[0]), float(np.percentile(samples, 2.5)),
            float(np.percentile(samples, 97.5)))

  def compute_optimal(self, flops: float, theta=None) -> dict[str, float]:
    """N, D and loss minimising L(N, D) at C = 6 N D = ``flops``."""
    if self.law != "ND":
      raise ValueError("compute-optimal sizes need the joint law L(N, D)")
    c = self.constants(theta)
    a, b = c["alpha"], c["beta"]
    g = (a * c["A"] / (b * c["B"])) ** (1.0 / (a + b))
    n = g * (flops / 6.0) ** (b / (a + b))
    d = (flops / 6.0) / n
    return {"N": n, "D": d, "loss": float(self.predict(n, d, theta)[0])}

  def to_json(self) -> dict[str, Any]:
    return {"law": self.law, "constants": self.constants(),
            "intervals_95": {k: list(v) for k, v in self.intervals().items()},
            "points": self.points, "bootstrap_samples": len(self.boot),
            "rms_log_residual": float(np.sqrt(np.mean(self.residuals ** 2)))}


def fit_law(law: str, n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
            bootstrap: int = 200, seed: int = 0) -> Fit:
  """Fit ``law`` ('N', 'D' or 'ND') to the points; see the module docstring."""
  if law not in LAWS:
    raise ValueError(f"law={law!r}: choose one of {sorted(LAWS)}")
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  if not (len(n) == len(d) == len(loss)):
    raise ValueError("n, d and loss must have one value per point")
  if np.any(loss <= 0) or np.any(n <= 0) or np.any(d <= 0) or not np.all(np.isfinite(loss)):
    raise ValueError("every N, D and loss must be positive and finite (a log-log fit)")
  if len(loss) < len(LAWS[law]):
    raise ValueError(f"L({', '.join(law)}) has {len(LAWS[law])} constants; it needs at least "
                     f"as many points, got {len(loss)}")
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  weights = np.ones_like(log_l)
  starts = _linear_starts(law, log_n, log_d, log_l, weights, keep=6)
  theta = _minimize(starts, log_n, log_d, log_l, law, weights)[0][1]
  # Bootstrap: a resample is integer weights on the points; each is refitted
  # from its own linear starts and from the full fit.
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(bootstrap):
    counts = np.bincount(rng.integers(0, len(loss), len(loss)), minlength=len(loss)).astype(float)
    starts = np.concatenate([theta[None], _linear_starts(law, log_n, log_d, log_l, counts,
                                                         keep=1, size=8)])
    boot.append(_minimize(starts, log_n, log_d, log_l, law, counts)[0][1])
  residuals = log_l - _log_predict(theta, log_n, log_d, law)
  return Fit(law, theta, np.array(boot).reshape(-1, len(theta)), residuals, len(loss))


def _frontier(key: np.ndarray, other: np.ndarray) -> np.ndarray:
  """Indices of the points with the largest ``other`` for each value of ``key``."""
  keep = []
  for k in np.unique(key):
    idx = np.flatnonzero(key == k)
    keep += list(idx[other[idx] == other[idx].max()])
  return np.array(sorted(keep), int)


PARAMS_COLUMNS = {"non_embedding": "non_embedding_params", "total": "params"}


def fit_sweep(rows: list[dict[str, Any]], metric: str, *, params: str = "non_embedding",
              bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
  """The three laws on a sweep's summary rows; returns {'N'|'D'|'ND': Fit}
  (a law is missing when the sweep has too few distinct values for it) and
  the arrays used under 'data'."""
  if params not in PARAMS_COLUMNS:
    raise ValueError(f"--params {params!r}: choose one of {sorted(PARAMS_COLUMNS)}")
  done = [r for r in rows if r.get("status") == "done"]
  if not done:
    raise ValueError("no finished point in the sweep yet; run `datong sweep` to completion")
  if not isinstance(done[0].get(metric), float):
    names = sorted(k for k, v in done[0].items() if k.startswith("eval/"))
    raise ValueError(f"metric {metric!r} is not in the sweep's summary; it has {names}. "
                     "Pass one of them with --metric.")
  n = np.array([r[PARAMS_COLUMNS[params]] for r in done], float)
  d = np.array([r["tokens"] for r in done], float)
  loss = np.array([r[metric] for r in done], float)
  out: dict[str, Any] = {"data": {"N": n, "D": d, "loss": loss,
                                  "points": [r["point"] for r in done]}, "notes": []}
  for law, idx, distinct in (("N", _frontier(n, d), np.unique(n)),
                             ("D", _frontier(d, n), np.unique(d)),
                             ("ND", np.arange(len(loss)), None)):
    if distinct is not None and len(distinct) < 3:
      out["notes"].append(f"L({law}) not fitted: {len(distinct)} distinct value(s) of {law}; "
                          "it needs at least 3.")
      continue
    if len(idx) < len(LAWS[law]):
      out["notes"].append(f"L({law}) not fitted: {len(idx)} points for {len(LAWS[law])} constants.")
      continue
    if len(idx) == len(LAWS[law]):
      out["notes"].append(f"L({law}): as many points as constants; the fit passes through them "
                          "and its intervals mean little.")
    out[law] = fit_law(law, n[idx], d[idx], loss[idx], bootstrap=bootstrap, seed=seed)
  if "ND" in out:
    out["notes"] += _unresolved_terms(out["ND"], n, d)
  return out


def _unresolved_terms(fit: Fit, n: np.ndarray, d: np.ndarray, share: float = 0.02) -> list[str]:
  """Notes for terms of L(N, D) that the points do not resolve: a term whose
  change across the sweep is under ``share`` of the loss has no measurable
  effect, so its constants (and the compute-optimal sizes) are extrapolation."""
  c = fit.constants()
  pred = fit.predict(n, d)
  notes = []
  for name, term in (("N", c["A"] * n ** -c["alpha"]), ("D", c["B"] * d ** -c["beta"])):
    spread = float((term.max() - term.min()) / pred.mean())
    if spread < share:
      notes.append(f"L(N, D): the {name} term changes the loss by {spread:.2%} across the sweep "
                   f"(under {share:.0%}): the sweep does not resolve how the loss scales with "
                   f"{name}, so its constants and the compute-optimal N and D are not "
                   "meaningful. Train longer or over a wider range of " + name + ".")
  if c["E"] < 1e-3 * float(pred.min()):
    notes.append("L(N, D): E fitted at ~0: the irreducible loss is not identified by these "
                 "points (the loss is still far from any floor).")
  return notes


def plot_fits(result: dict[str, Any], metric: str, directory: str) -> list[str]:
  """loss_vs_N.png, loss_vs_D.png, isoflop.png; returns the paths written."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  data = result["data"]
  n, d, loss = data["N"], data["D"], data["loss"]
  paths = []

  def save(fig, name):
    path = os.path.join(directory, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    paths.append(path)

  for axis_name, x, other, other_name in (("N", n, d, "D"), ("D", d, n, "N")):
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
    for value in np.unique(other):
      sel = other == value
      line = ax.plot(x[sel], loss[sel], "o", label=f"{other_name}={value:.3g}")[0]
      if "ND" in result:
        kw = {"n": grid, "d": value} if axis_name == "N" else {"n": value, "d": grid}
        ax.plot(grid, result["ND"].predict(**kw), "-", color=line.get_color(), alpha=0.6)
    if axis_name in result:
      kw = {"n": grid} if axis_name == "N" else {"d": grid}
      c = result[axis_name].constants()
      label = (f"L({axis_name}) = {c['E']:.3g} + {c.get('A', c.get('B')):.3g} {axis_name}"
               f"^-{c.get('alpha', c.get('beta')):.3f}")
      ax.plot(grid, result[axis_name].predict(**kw), "k--", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N" if axis_name == "N" else "training tokens D")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title(f"{metric} vs {axis_name} (lines: joint fit per {other_name})", fontsize=9)
    save(fig, f"loss_vs_{axis_name}.png")

  if "ND" in result:
    fit = result["ND"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    flops = 6.0 * n * d
    grid = np.geomspace(n.min() / 3, n.max() * 3, 200)
    for c in np.geomspace(flops.min(), flops.max(), 4):
      line = ax.plot(grid, fit.predict(grid, c / (6.0 * grid)), "-", label=f"C={c:.2g}")[0]
      opt = fit.compute_optimal(c)
      ax.plot([opt["N"]], [opt["loss"]], "*", ms=11, color=line.get_color())
    ax.scatter(n, loss, c=np.log10(flops), cmap="viridis", s=18, zorder=3,
               label="runs (color: log10 6ND)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(metric)
    ax.set_title("IsoFLOP curves of the joint fit (stars: compute-optimal N)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "isoflop.png")
  return paths


def parse_predict(text: str) -> dict[str, float]:
  """``"N=3e6,D=2e6"`` -> {'N': 3e6, 'D': 2e6}."""
  out = {}
  for item in text.split(","):
    key, sep, value = item.partition("=")
    key = key.strip().upper()
    try:
      number = float(value)
    except ValueError:
      number = float("nan")
    if not sep or key not in ("N", "D") or not number > 0:
      raise ValueError(f"--predict {text!r}: expected N=<params>,D=<tokens> with positive "
                       "numbers, e.g. N=3e6,D=2e6.")
    out[key] = number
  if set(out) != {"N", "D"}:
    raise ValueError(f"--predict {text!r}: give both N and D, e.g. N=3e6,D=2e6.")
  return out


def report(result: dict[str, Any], metric: str, *, budgets: Sequence[float] = (),
           predict: Optional[dict[str, float]] = None) -> dict[str, Any]:
  """The JSON-able record of a fit (constants, intervals, compute-optimal
  sizes per budget, the prediction)."""
  out: dict[str, Any] = {"metric": metric, "notes": list(result["notes"]),
                         "points": result["data"]["points"]}
  for law in LAWS:
    if law in result:
      out[f"L({', '.join(law)})"] = result[law].to_json()
  if "ND" in result:
    fit = result["ND"]
    out["compute_optimal"] = []
    for c in budgets:
      best = fit.compute_optimal(c)
      samples = [fit.compute_optimal(c, t) for t in fit.boot]
      ci = {k: [float(np.percentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
            for k in ("N", "D")}
      out["compute_optimal"].append({"flops": c, **best, "intervals_95": ci})
    if predict is not None:
      value, low, high = fit.predict_interval(predict["N"], predict["D"])
      out["prediction"] = {"N": predict["N"], "D": predict["D"], "loss": value,
                           "interval_95": [low, high]}
  elif predict is not None:
    raise ValueError("--predict needs the joint law L(N, D), which was not fitted: "
                     + "; ".join(result["notes"]))
  return out


def format_report(rec: dict[str, Any]) -> str:
  lines = [f"metric: {rec['metric']} ({len(rec['points'])} points)"]
  for law in ("L(N)", "L(D)", "L(N, D)"):
    if law in rec:
      parts = [f"{k}={v:.4g} [{lo:.3g}, {hi:.3g}]" for (k, v), (lo, hi) in
               zip(rec[law]["constants"].items(), rec[law]["intervals_95"].values())]
      lines.append(f"{law}: " + ", ".join(parts) +
                   f"  (rms log residual {rec[law]['rms_log_residual']:.4f})")
  for item in rec.get("compute_optimal", []):
    lines.append(f"compute-optimal at C={item['flops']:.3g} FLOPs: N={item['N']:.3g} "
                 f"[{item['intervals_95']['N'][0]:.3g}, {item['intervals_95']['N'][1]:.3g}], "
                 f"D={item['D']:.3g} [{item['intervals_95']['D'][0]:.3g}, "
                 f"{item['intervals_95']['D'][1]:.3g}], loss {item['loss']:.4g}")
  if "prediction" in rec:
    p = rec["prediction"]
    lines.append(f"predicted {rec['metric']} at N={p['N']:.4g}, D={p['D']:.4g}: {p['loss']:.4f} "
                 f"(95% interval {p['interval_95'][0]:.4f} .. {p['interval_95'][1]:.4f})")
  lines += [f"note: {n}" for n in rec["notes"]]
  return "\n".join(lines)


def write_report(rec: dict[str, Any], directory: str) -> str:
  path = os.path.join(directory, "fit.json")
  with open(path, "w") as f:
    json.dump(rec, f, indent=1, allow_nan=False)
  return path
