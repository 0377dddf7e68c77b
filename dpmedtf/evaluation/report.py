"""An HTML report of one run (a model, or a sweep): tables, figures, fairness, privacy audit."""

from __future__ import annotations

import html
from pathlib import Path

SYNTHETIC_BANNER = ("SYNTHETIC DATA — these images are generated, not patients. The numbers show that the pipeline "
                    "works; no clinical or diagnostic claim rests on them.")

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.banner{background:#fff3cd;border:1px solid #e0c36a;
padding:0.7em 1em;font-weight:600}.warn{color:#a15c00}img{max-width:100%;border:1px solid #ddd;margin:0.4em 0}
h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}.note{color:#555;font-size:13px}"""


def _number(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _attack_auc(result: dict) -> str:
    if result.get("auc_standard_error") is None:
        return _number(result.get("auc"))
    return f"{_number(result['auc'])} ± {_number(result['auc_standard_error'])}"


def _measured(audit: dict | None, member_name: str) -> str:
    if not audit or audit.get("member") != member_name:
        return "–"
    return f"≥ {audit['epsilon_lower_bound']:.3g} ({audit['confidence']:.0%}, {html.escape(audit['kind'])})"


def _audit_section(audit: dict, figure: Path | None) -> list[str]:
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
        parts.append(f"<img src='{html.escape(figure.as_posix())}' alt='canary audit bound'>")
    return parts


def write_report(out: Path, title: str, members: list, sweep: dict | None, figures: list[Path], synthetic: bool,
                 audit: dict | None = None, audit_figure: Path | None = None) -> Path:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if synthetic:
        parts.append(f"<p class='banner'>{SYNTHETIC_BANNER}</p>")
    parts.append("<h2>Models (test split)</h2>")
    rows = []
    for m in sorted(members, key=lambda m: (m.epsilon is None, m.epsilon or 0)):
        mean, mia = m.metrics["mean"], m.metrics.get("membership_inference", {}).get("entire_dataset", {})
        rows.append([html.escape(m.name), "non-private" if m.epsilon is None else f"{m.epsilon:.4g} per {m.unit}",
                     "–" if m.epsilon is None else ("no finite bound" if m.patient_epsilon is None
                                                    else f"{m.patient_epsilon:.4g}"),
                     f"{_number(mean['auroc'])} [{_number(mean['auroc_ci_low'])}, {_number(mean['auroc_ci_high'])}]",
                     _number(mean["sensitivity"]), _number(mean["specificity"]), _number(mean["accuracy"]),
                     _attack_auc(mia.get("threshold_attack", {})), _attack_auc(mia.get("trained_attack", {})),
                     _measured(audit, m.name)])
    parts.append(_table(["model", "certified ε", "patient-level ε", "mean AUROC [95% CI]", "sensitivity", "specificity", "accuracy",
                         "MIA AUC ± SE (threshold)", "MIA AUC ± SE (trained)", "measured ε (canary audit)"], rows))
    parts.append("<p class='note'>Thresholds: Youden index on the validation split, applied unchanged to test. "
                 "MIA: training images (members) vs test images; 0.5 = the attacker cannot tell them apart.</p>")
    if sweep:
        parts.append("<h2>Across ε</h2>")
        rows = [[html.escape(m["name"]), _number(m["mean_auroc"]), _number(m["auroc_vs_positives"]["r"]),
                 _number(m.get("auroc_drop_vs_positives", {}).get("r"))] for m in sweep["models"]]
        parts.append(_table(["model", "mean AUROC", "Pearson r: AUROC vs positives", "Pearson r: DP drop vs positives"], rows))
    if audit:
        parts.extend(_audit_section(audit, audit_figure))
    for figure in figures:
        parts.append(f"<img src='{html.escape(figure.name)}' alt='{html.escape(figure.stem)}'>")
    parts.append("<h2>Subgroups (mean over findings)</h2>")
    for m in sorted(members, key=lambda m: (m.epsilon is None, m.epsilon or 0)):
        parts.append(f"<h3>{html.escape(m.name)}</h3>")
        rows = []
        for r in m.fairness["rows"]:
            if r["finding"] != "mean":
                continue
            warning = f"<span class='warn'>{html.escape(r['warning'])}</span>" if r.get("warning") else ""
            rows.append([html.escape(r["attribute"]), html.escape(r["group"]), r["n"],
                         f"{_number(r['auroc'])} [{_number(r['auroc_ci_low'])}, {_number(r['auroc_ci_high'])}]",
                         _number(r["accuracy"]), _number(r["statistical_parity_difference"]), _number(r["fnr"]),
                         _number(r["fpr"]), _number(r["ece"]), warning])
        parts.append(_table(["attribute", "group", "n", "AUROC [95% CI]", "accuracy", "parity diff.", "FNR",
                             "FPR", "ECE", ""], rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
