"""The model card for people: Markdown through the release managers' template, and HTML from that Markdown.

Both are renderings of ``model_card.json`` (``model_card.build_model_card``) and nothing else, so what a
person reads and what a program reads cannot disagree. The template (``release/model_card.md``) decides
the wording and order; this module only turns the card's sections into Markdown blocks for its
``${...}`` slots. The HTML is the rendered template, so a changed template changes both.
"""

from __future__ import annotations

import html
import math
import re
import string
from typing import Any, Mapping, Sequence

from dpmedtf.release.model_card import METHOD_CITATION, NOT_GIVEN, SYNTHETIC_NOTICE
from dpmedtf.resources import release_file

TEMPLATE = "model_card.md"


def number_text(value, digits: int = 3) -> str:
    """A number for a card or fairness table; "n/a" for null or NaN (a rate with no denominator)."""
    if value is None or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def auroc_interval_text(row: Mapping[str, Any]) -> str:
    """AUROC (95% CI low–high) of a metrics or fairness row."""
    return f"{number_text(row['auroc'])} ({number_text(row['auroc_ci_low'])}–{number_text(row['auroc_ci_high'])})"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: a '|' would end the cell, a newline the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"- {' '.join(str(line).split())}" for line in lines) if lines else "- none"


def _shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _license_text(licenses: Sequence[Mapping[str, str]]) -> str:
    return "; ".join(entry.get("identifier") or entry.get("custom_text", "") for entry in licenses) or NOT_GIVEN


def _privacy_headline(privacy: Mapping[str, Any]) -> str:
    accounting, setting = privacy["accounting"], privacy["dp_setting"]
    if not setting["secret_randomness"]:
        return "**NO differential privacy guarantee** (a reproducible experiment)"
    cross = accounting["cross_check"]
    return (f"(ε = {accounting['epsilon']:.4g}, δ = {accounting['delta']:g})-differential privacy per "
            f"{setting['unit_of_privacy']} ({accounting['accountant'].upper()}; {cross['accountant'].upper()} gives "
            f"{cross['epsilon']:.4g})")


def _patient_privacy(setting: Mapping[str, Any]) -> str:
    """The line on what a whole patient is protected by."""
    patient = setting["patient_level"]
    if setting["unit_of_privacy"] == "patient":
        return f"ε = {patient['epsilon']:.4g}, δ = {patient['delta']:g}: the unit of privacy is the patient"
    k = patient["max_images_per_patient"]
    if patient["epsilon"] is None:
        return (f"no finite bound for a patient with {k} images (group privacy); the guarantee is per "
                f"{setting['unit_of_privacy']} only")
    return f"ε = {patient['epsilon']:.4g}, δ = {patient['delta']:g} for a patient with up to {k} images (group privacy)"


_HYPERPARAMETERS = (
    ("regime", "Training"), ("optimizer", "Optimizer"), ("learning_rate", "Learning rate"),
    ("expected_batch_size", "Expected batch size (Poisson sampling)"),
    ("max_physical_batch", "Physical batch (memory only)"),
    ("epochs", "Epochs"), ("steps", "Steps"), ("clip_norm", "Clip norm C"), ("example_clip_norm", "Clip norm per image"),
    ("noise_multiplier", "Noise multiplier σ"), ("sampling", "Sampling"), ("sampling_rate", "Sampling rate q"),
    ("clipping_engine", "Per-example clipping engine"), ("unit_of_privacy", "Unit of privacy"),
    ("max_images_per_patient_per_step", "Images per patient per step (at most)"), ("accountant", "Accountant"),
    ("target_epsilon", "Target ε"), ("delta", "δ"), ("class_weights", "Class weights"),
    ("class_count_noise_std", "Noise std of the DP class counts"), ("augmentation", "Augmentation"),
    ("activation", "Activation"), ("group_norm_groups", "GroupNorm groups"), ("scale_norm", "Scale normalisation"),
    ("pretrained_weights", "Pretrained weights (public)"), ("pretrained_on", "Pretrained on"),
)


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _cell(value)


def _hyperparameters(procedure: Mapping[str, Any]) -> str:
    shown = dict(procedure)
    if procedure.get("clipping_engine_description"):
        engine = procedure.get("clipping_engine") or "—"
        shown["clipping_engine"] = f"{engine} ({procedure['clipping_engine_description']})"
    rows = [f"| {label} | {_value(shown.get(key))} |" for key, label in _HYPERPARAMETERS if key in shown]
    return "| Hyperparameter | Value |\n|---|---|\n" + "\n".join(rows)


def _metrics_table(evaluation: Mapping[str, Any]) -> str:
    rows = [f"| {_cell(m['label'])} | {auroc_interval_text(m)} | {number_text(m['threshold'])} | {number_text(m['sensitivity'])} | "
            f"{number_text(m['specificity'])} | {m['n_positive'] if m['n_positive'] is not None else 'n/a'} |"
            for m in evaluation["metrics"]]
    mean = evaluation["mean"]
    rows.append(f"| **mean** | {auroc_interval_text(mean)} | | {number_text(mean['sensitivity'])} | {number_text(mean['specificity'])} | |")
    return "\n".join(rows)


def _subgroup_table(subgroups: Mapping[str, Any]) -> str:
    return "\n".join(
        f"| {_cell(r['attribute'])} | {_cell(r['group'])} | {r['n']} | {auroc_interval_text(r)} | {number_text(r['accuracy'])} | "
        f"{number_text(r['statistical_parity_difference'])} | {number_text(r['fnr'])} | {number_text(r['fpr'])} |"
        for r in subgroups["rows"])


def _figures(graphics: Mapping[str, Any]) -> str:
    if not graphics["collection"]:
        return ""
    parts = ["### Figures", ""]
    for figure in graphics["collection"]:
        parts += [f"**{figure['name']}**", "", f"![{figure['name']}]({figure['image']})", ""]
    return "\n".join(parts).rstrip()


def _privacy_table(privacy: Mapping[str, Any], training_data: Mapping[str, Any]) -> str:
    setting, accounting, sgd = privacy["dp_setting"], privacy["accounting"], privacy["dp_training"]
    composition = " + ".join(f"{_cell(m['what'])} (ε alone {m['epsilon_alone']:.4g})" for m in accounting["composition"])
    pretraining = privacy["public_pretraining"]
    rows = [
        ("Guarantee", setting["guarantee"]),
        ("Unit of privacy", f"{setting['unit_of_privacy']}: {setting['neighbouring_relation']['description']}"),
        ("Privacy per patient", _patient_privacy(setting)),
        ("ε, δ", f"ε = {accounting['epsilon']:.4g}, δ = {accounting['delta']:g} (1/N = {accounting['one_over_n']:.3g})"),
        ("Accountant", f"{accounting['accountant'].upper()} (dp_accounting); "
                       f"{accounting['cross_check']['accountant'].upper()} gives ε = "
                       f"{accounting['cross_check']['epsilon']:.4g} for the same event"),
        ("Composition", f"{composition} → ε = {accounting['epsilon']:.4g}"),
        ("Noise multiplier σ", f"{sgd['noise_multiplier']:.5g}"),
        ("Clip norm C", f"{sgd['clip_norm']:g}"),
        ("Sampling", f"{sgd['sampling']}, rate q = {sgd['sampling_rate']:.4g} (expected batch {sgd['expected_batch_size']} "
                     f"of N = {sgd['dataset_size']:,} {training_data['unit']}s)"),
        ("Steps", f"{sgd['steps']:,}"),
        ("Randomness", "a secret per-run key from OS entropy" if setting["secret_randomness"]
         else "fixed by privacy.noise_seed (reproducible experiment)"),
        ("Covers", setting["protects"]),
        ("Public pretraining", "none" if not pretraining.get("weights") else
         f"{pretraining['weights']} (on {pretraining.get('data') or 'unstated data'}"
         + (f"; labels: {pretraining['label_set']['name']}, {len(pretraining['label_set']['findings'])} findings; "
            f"head: {pretraining.get('head')}" if pretraining.get("label_set") else "") + ")"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {label} | {_cell(value)} |" for label, value in rows) + \
        f"\n\n{accounting['composition_note']}"


def _dp_coverage(privacy: Mapping[str, Any]) -> str:
    outside = [f"**{u['what']}**: {u['how']}" for u in privacy["non_dp_uses_of_private_data"] if u["private_data_used"]]
    public = [f"**{u['what']}**: {u['how']}" for u in privacy["non_dp_uses_of_private_data"] if not u["private_data_used"]]
    text = (f"Differentially private (composed into ε): {', '.join(privacy['dp_training']['dp_parts'])}.\n\n"
            "Uses of private data outside DP, **not covered by ε**:\n" + _bullets(outside))
    if public:
        text += "\n\nOther choices, made without private data:\n" + _bullets(public)
    return text


def _empirical_privacy(privacy: Mapping[str, Any]) -> str:
    lines = []
    attack = privacy["membership_inference"]
    if attack:
        found = [(name.replace("_", " "), attack[name]) for name in ("threshold_attack", "trained_attack")
                 if isinstance(attack.get(name), Mapping)]
        results = "; ".join(f"{name}: AUC {number_text(a.get('auc'))} (± {number_text(a.get('auc_standard_error'))}), "
                            f"advantage {number_text(a.get('advantage'))}" for name, a in found)
        lines.append(f"**Membership inference** ({attack.get('n_members')} members from the {attack.get('members')}, "
                     f"{attack.get('n_nonmembers')} non-members from the {attack.get('non_members')}): {results}. "
                     f"{attack['meaning']}")
    audit = privacy["canary_audit"]
    if audit:
        lines.append(f"**Canary audit** (`{audit['file']}`): measured ε ≥ {audit['epsilon_lower_bound']:.3g} at "
                     f"{audit['confidence']:.0%} confidence ({audit['kind']}, {audit['canaries']} canaries) against the "
                     f"{audit['certified_epsilon']:.4g} the mechanism certifies for the audit twin. A lower bound from "
                     "one attack, not a proof of privacy.")
    return "\n\n".join(lines) or "None recorded for this model."


def _tradeoff(tradeoff: Mapping[str, Any] | None, considerations: Mapping[str, Any]) -> str:
    notes = "\n".join(f"- {t['description']}" for t in considerations["tradeoffs"])
    if tradeoff is None:
        return notes
    mean = tradeoff["mean_auroc"]
    rows = [f"| **mean** | {auroc_interval_text(mean['private'])} | {auroc_interval_text(mean['non_private'])} | "
            f"{number_text(mean['difference'])} |"]
    rows += [f"| {_cell(r['label'])} | {number_text(r['private_auroc'])} | {number_text(r['non_private_auroc'])} | "
             f"{number_text(r['difference'])} |" for r in tradeoff["per_label"]]
    return (f"Test AUROC of this model (ε = {tradeoff['epsilon']:.4g}) and of {tradeoff['baseline_description']}:\n\n"
            "| Label | DP AUROC | Non-private AUROC | Difference |\n|---|---|---|---|\n" + "\n".join(rows)
            + "\n\n" + notes)


def _citations(texts: Sequence[str]) -> str:
    own = [text for text in texts if text != METHOD_CITATION]
    method = f"Cite the method it implements: {METHOD_CITATION}"
    return f"Cite this model as: {' '.join(own)}\n\n{method}" if own else method


def _policy_section(policy: Mapping[str, Any]) -> str:
    source = f"{policy['name']}" + (f" (`{policy['file']}`, SHA-256 `{policy['sha256']}`)" if policy.get("file") else "")
    if policy["override"]:
        override = policy["override"]
        return (f"**Released with an explicit policy override** by {override['by']}: {override['reason']}\n\n"
                f"Broken rules of the release policy {source}:\n" + _bullets(policy["violations"]))
    return f"Meets every rule of the release policy {source}."


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """``model_card.md``: the release managers' template filled from ``card``."""
    details, privacy = card["model_details"], card["privacy"]
    considerations, evaluation = card["considerations"], card["evaluation"]
    synthetic = details["synthetic_data"]
    values = {
        "name": details["name"],
        "synthetic_banner": f"> **{SYNTHETIC_NOTICE}**" if synthetic else "",
        "version": _cell(details["version"]["name"]), "date": details["version"]["date"],
        "dpmedtf_version": details["dpmedtf_version"],
        "owners": _cell(", ".join(o["name"] for o in details["owners"]) or NOT_GIVEN),
        "license": _cell(_license_text(details["licenses"])),
        "contact": _cell(details["contact"] or NOT_GIVEN),
        "task": _cell(details["task"]),
        "architecture": f"{details['architecture']['name']}, {details['architecture']['parameters']:,} parameters",
        "input_shape": _shape(details["input"]["shape"]), "output_shape": _shape(details["output"]["shape"]),
        "privacy_headline": _privacy_headline(privacy),
        "patient_privacy": _patient_privacy(privacy["dp_setting"]),
        "overview": details["overview"],
        "intended_use": "\n\n".join(card["intended_use"]["primary_uses"]) or NOT_GIVEN,
        "users": _bullets(card["intended_use"]["primary_users"]),
        "out_of_scope": _bullets(card["intended_use"]["out_of_scope_uses"]),
        "training_data": card["training_data"]["description"],
        "preprocessing": "\n".join(f"{i}. {step}" for i, step in enumerate(card["training_data"]["preprocessing"], 1)),
        "hyperparameters": _hyperparameters(card["training_procedure"]),
        "evaluation_data": (f"{evaluation['data']['description']} Thresholds: {evaluation['thresholds_chosen_on']}. "
                            f"95% confidence intervals: {evaluation['confidence_intervals']['method']} "
                            f"({evaluation['confidence_intervals']['redraws']} redraws, "
                            f"{evaluation['confidence_intervals']['interval']})."),
        "synthetic_note": f"_{SYNTHETIC_NOTICE}_" if synthetic else "",
        "metrics_table": _metrics_table(evaluation),
        "figures": _figures(card["quantitative_analysis"]["graphics"]),
        "subgroup_table": _subgroup_table(card["subgroup_results"]),
        "subgroup_warnings": ("Groups with too few positive or negative examples for reliable numbers: "
                              + ", ".join(card["subgroup_results"]["unreliable_groups"]) + ".")
        if card["subgroup_results"]["unreliable_groups"] else "",
        "privacy_statement": privacy["statement"],
        "privacy_table": _privacy_table(privacy, card["training_data"]),
        "dp_coverage": _dp_coverage(privacy),
        "tuning": privacy["hyperparameter_tuning"]["statement"],
        "empirical_privacy": _empirical_privacy(privacy),
        "tradeoff": _tradeoff(card["privacy_utility_tradeoff"], considerations),
        "policy_section": _policy_section(card["release_policy"]),
        "limitations": _bullets([entry["description"] for entry in considerations["limitations"]]),
        "ethical_considerations": _bullets([f"**{e['name']}**: {e['mitigation_strategy']}"
                                            for e in considerations["ethical_considerations"]]),
        "citations": _citations([c["citation"] for c in details["citations"]]),
        "references": _bullets([f"[{r['title']}]({r['reference']})" for r in details["references"]]),
    }
    text = string.Template(release_file(TEMPLATE).read_text()).substitute(values)
    return re.sub(r"\n{3,}", "\n\n", text)  # an empty optional block leaves no gap


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}blockquote{background:#fff3cd;border:1px solid #e0b000;margin:1rem 0;padding:.2rem .8rem}
img{max-width:100%;border:1px solid #ddd}code{background:#f4f4f4;padding:0 .2rem}h2{border-bottom:1px solid #ddd;margin-top:2rem}"""


def model_card_html(markdown: str, title: str) -> str:
    """``model_card.html``: a standalone page of the rendered Markdown, figures by their bundle file names."""
    # markdown-it-py comes with rich, a dependency of dpmedtf; with html off, text from the data or the
    # release managers is escaped rather than interpreted as markup, and unsafe link schemes are refused.
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Model card: {html.escape(title)}</title>\n<style>{_STYLE}</style></head>\n"
            f"<body>\n{body}</body></html>\n")
