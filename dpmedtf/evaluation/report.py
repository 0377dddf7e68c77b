"""An HTML report of one run (a model, or a sweep): tables, figures, fairness, privacy audit.

One self-contained page: every figure is embedded as a base64 data URI, so the page renders when mailed,
archived or opened from a bundle without the PNGs beside it or a server.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dpmedtf.evaluation.fairness import MIN_POSITIVES
from dpmedtf.evaluation.model_plots import UNRELIABLE

SYNTHETIC_BANNER = ("SYNTHETIC DATA — these images are generated, not patients. The numbers show that the pipeline "
                    "works; no clinical or diagnostic claim rests on them.")

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.banner{background:#fff3cd;border:1px solid #e0c36a;
padding:0.7em 1em;font-weight:600}.warn{color:#a15c00}img{max-width:100%;border:1px solid #ddd;margin:0.4em 0}
h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}.note{color:#555;font-size:13px}.warning{color:#8a4b00;font-size:13px}
tr.unreliable td{color:#8a8a8a;background:#f7f7f7}figure{margin:0.6em 0 1.2em}figcaption{color:#555;font-size:12px}"""


def _number(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(estimate, low, high) -> str:
    return f"{_number(estimate)} [{_number(low)}, {_number(high)}]"


def _p_value(value) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _pearson(result: dict | None) -> str:
    """r with its p and the number of findings it rests on: with 8 points an r means little without them."""
    if not result or result.get("r") is None:
        return "–" if not result else f"not defined (n = {result.get('n')})"
    p = _p_value(result["p"])
    return f"{result['r']:.2f} (p {p if p.startswith('<') else '= ' + p}, n = {result['n']})"


def _table(header: list[str], rows: list[list], row_classes: list[str | None] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    classes = row_classes or [None] * len(rows)
    body = "".join((f"<tr class='{css}'>" if css else "<tr>") + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row, css in zip(rows, classes))
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(path: Path, base: Path) -> str:
    """The PNG at ``path`` embedded as a data URI, captioned with its path relative to the report's directory
    ``base`` so a reader can find the file itself."""
    path, base = Path(path).resolve(), Path(base).resolve()
    where = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
    if not path.is_file():
        return f"<p class='note warn'>figure not found: {html.escape(where)}</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.stem)}'>"
            f"<figcaption>{html.escape(where)}</figcaption></figure>")


def _attack_auc(result: dict) -> str:
    if result.get("auc_standard_error") is None:
        return _number(result.get("auc"))
    return f"{_number(result['auc'])} ± {_number(result['auc_standard_error'])}"


def _measured(audit: dict | None, member_name: str) -> str:
    if not audit or audit.get("member") != member_name:
        return "–"
    return f"≥ {audit['epsilon_lower_bound']:.3g} ({audit['confidence']:.0%}, {html.escape(audit['kind'])})"


def _audit_section(audit: dict, figure: Path | None, base: Path) -> list[str]:
    synthetic = " Measured on SYNTHETIC data." if audit.get("synthetic_data") else ""
    over = audit["epsilon_lower_bound"] > audit["certified_epsilon"]
    verdict = ("<p class='warn'>The measured lower bound EXCEEDS the certified ε: the implementation does less than "
               "its certificate claims. Do not release.</p>" if over else "")
    if not over and not audit.get("can_refute_certificate", True):
        verdict = (f"<p class='warn'>With {audit['canaries']} canaries even a perfect attacker could show at most "
                   f"ε ≥ {audit['epsilon_lower_bound_ceiling']:.3g}, below the certified ε: this audit could not have "
                   "caught a mechanism weaker than certified. More canaries raise that ceiling (about log m).</p>")
    parts = ["<h2>Canary audit: measured ε lower bound vs certified ε</h2>", verdict,
             _table(["model", "measured ε ≥", "certified ε (twin)", "confidence", "δ", "kind", "canaries",
                     "right guesses"],
                    [[html.escape(str(audit["member"])), _number(audit["epsilon_lower_bound"]),
                      _number(audit["certified_epsilon"]), f"{audit['confidence']:.0%}", f"{audit['delta']:g}",
                      html.escape(audit["kind"]), audit["canaries"],
                      f"{audit['correct_guesses']} of {audit['guesses']}"]]),
             f"<p class='note'>{html.escape(audit['meaning'])} Method: {html.escape(audit['method'])}. Privacy cost "
             f"for the released model: {html.escape(audit['privacy_cost_for_release'])}.{synthetic}</p>"]
    if figure is not None:
        parts.append(_figure(figure, base))
    return parts


def _by_epsilon(members: list) -> list:
    return sorted(members, key=lambda m: (m.epsilon is None, m.epsilon or 0))


def _not_evaluable_notes(members: list) -> list[str]:
    """Which findings each mean covers, where a split held one class of a finding (older metrics: none)."""
    notes = []
    for m in members:
        missing = m.metrics.get("not_evaluable") or {}
        if missing:
            covered = m.metrics["mean"].get("auroc_over", [])
            details = "; ".join(f"{html.escape(name)}: {html.escape(', '.join(reasons.values()))}"
                                for name, reasons in missing.items())
            notes.append(f"<p class='warning'>{html.escape(m.name)}: the mean AUROC covers {len(covered)} finding(s) "
                         f"({html.escape(', '.join(covered)) or 'none'}). {details}.</p>")
    return notes


def _models_table(members: list, audit: dict | None) -> list[str]:
    rows = []
    for m in _by_epsilon(members):
        mean, mia = m.metrics["mean"], m.metrics.get("membership_inference", {}).get("entire_dataset", {})
        rows.append([html.escape(m.name), "non-private" if m.epsilon is None else f"{m.epsilon:.4g} per {m.unit}",
                     "–" if m.epsilon is None else ("no finite bound" if m.patient_epsilon is None
                                                    else f"{m.patient_epsilon:.4g}"),
                     _interval(mean["auroc"], mean["auroc_ci_low"], mean["auroc_ci_high"]),
                     _number(mean["sensitivity"]), _number(mean["specificity"]), _number(mean["accuracy"]),
                     _attack_auc(mia.get("threshold_attack", {})), _attack_auc(mia.get("trained_attack", {})),
                     _measured(audit, m.name)])
    return ["<h2>Models (test split)</h2>",
            _table(["model", "certified ε (unit of privacy)", "patient-level ε", "mean AUROC [95% bootstrap CI]",
                    "mean sensitivity", "mean specificity", "mean accuracy",
                    "membership-inference attack AUC ± SE (loss-threshold attacker)",
                    "membership-inference attack AUC ± SE (trained attacker)", "measured ε lower bound (canary audit)"],
                   rows),
            *_not_evaluable_notes(members),
            "<p class='note'>Means are over findings. Sensitivity, specificity and accuracy at the Youden threshold "
            "chosen on the validation split, applied unchanged to test. Membership inference: training images "
            "(members) against test images; an attack AUC of 0.5 means the attacker cannot tell them apart.</p>"]


def _sweep_section(sweep: dict) -> list[str]:
    rows = [[html.escape(m["name"]), "non-private" if m["epsilon"] is None else f"{m['epsilon']:.4g}",
             _number(m["mean_auroc"]), _pearson(m["auroc_vs_positives"]), _pearson(m.get("auroc_drop_vs_positives"))]
            for m in sweep["models"]]
    parts = ["<h2>Across ε</h2>",
             _table(["model", "ε", "mean AUROC", "Pearson r (p, n): per-finding AUROC vs positive training images",
                     "Pearson r (p, n): AUROC drop (non-private − DP) vs positive training images"], rows)]
    tests = []
    for m in sweep["models"]:
        for finding, test in (m.get("versus_non_private") or {}).items():
            label = [html.escape(m["name"]), html.escape(finding.replace("_", " "))]
            if test is None:
                tests.append(label + ["not tested: fewer than 2 positives or negatives in test", "", "", ""])
                continue
            tests.append(label + [_number(test["auroc_difference"]),
                                  f"[{_number(test['ci_low'])}, {_number(test['ci_high'])}]",
                                  _p_value(test["p_bootstrap"]), _p_value(test["p_delong"])])
    if tests:
        parts += ["<h3>Paired tests: each DP model against the non-private model, per finding</h3>",
                  _table(["DP model", "finding", "AUROC difference (DP − non-private)", "95% paired-bootstrap CI",
                          "bootstrap p", "DeLong p"], tests),
                  "<p class='note'>Both models scored on the same test images; the CI and the bootstrap p come from "
                  "shared redraws, DeLong's test from the correlated ROC curves. p-values are per finding, not "
                  "corrected for multiple comparisons.</p>"]
    return parts


def _findings_table(member) -> str:
    rows = [[html.escape(name.replace("_", " ")), f.get("n_positive", "–"),
             _interval(f["auroc"], f["auroc_ci_low"], f["auroc_ci_high"]), _number(f["threshold"]),
             _number(f["sensitivity"]), _number(f["specificity"]), _number(f["accuracy"])]
            for name, f in member.metrics["findings"].items()]
    return _table(["finding", "positives in test", "AUROC [95% bootstrap CI]", "threshold (validation Youden)",
                   "sensitivity", "specificity", "accuracy"], rows)


def _subgroup_table(member) -> list[str]:
    """Mean-over-findings rows; a flagged group is greyed and marked, its reason in the mark's tooltip and
    said once under the table instead of once per row."""
    rows, classes = [], []
    for r in (r for r in member.fairness["rows"] if r["finding"] == "mean"):
        mark = (f" <span class='warn' title='{html.escape(r['warning'])}'>{UNRELIABLE}</span>"
                if r.get("warning") else "")
        rows.append([html.escape(r["attribute"]), html.escape(r["group"]) + mark, r["n"],
                     _interval(r["auroc"], r["auroc_ci_low"], r["auroc_ci_high"]), _number(r["accuracy"]),
                     _number(r["statistical_parity_difference"]), _number(r["fnr"]), _number(r["fpr"]),
                     _number(r["ece"])])
        classes.append("unreliable" if r.get("warning") else None)
    parts = [_table(["attribute", "group", "n", "AUROC [95% bootstrap CI]", "accuracy",
                     "accuracy parity difference (group − rest)", "underdiagnosis: false-negative rate (FNR)",
                     "false-positive rate (FPR)", "expected calibration error (ECE, 10 bins)"], rows, classes)]
    if any(classes):
        parts.append(f"<p class='note'><span class='warn'>{UNRELIABLE}</span> greyed: fewer than {MIN_POSITIVES} "
                     "positives or negatives for at least one finding (hover the mark for which): the group's AUROC "
                     "and rates are unreliable.</p>")
    return parts


def _model_section(member, figures: list[Path], base: Path) -> list[str]:
    parts = [f"<h2>Model {html.escape(member.name)}</h2>", "<h3>Per finding (test split)</h3>",
             _findings_table(member)]
    parts += [_figure(figure, base) for figure in figures]
    parts += ["<h3>Subgroups (mean over findings)</h3>", *_subgroup_table(member)]
    return parts


def write_report(out: Path, title: str, members: list, sweep: dict | None, figures: list[Path], synthetic: bool,
                 audit: dict | None = None, audit_figure: Path | None = None,
                 model_figures: dict[str, list[Path]] | None = None) -> Path:
    """``out``: the models table, the across-ε analysis of a sweep, the canary audit, the ``figures`` across ε,
    then one section per model with its ``model_figures`` (by member name). Every figure is embedded."""
    base = out.parent
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if synthetic:
        parts.append(f"<p class='banner'>{SYNTHETIC_BANNER}</p>")
    parts += _models_table(members, audit)
    if sweep:
        parts += _sweep_section(sweep)
    if audit:
        parts += _audit_section(audit, audit_figure, base)
    if figures:
        parts += ["<h2>Figures across ε</h2>", *(_figure(figure, base) for figure in figures)]
    for member in _by_epsilon(members):
        parts += _model_section(member, (model_figures or {}).get(member.name, []), base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
