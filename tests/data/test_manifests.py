"""Manifests: labels as the paper maps them, every bad row named, patient-wise stratified splits."""

import numpy as np
import pandas as pd
import pytest

from dpmedtf.data import labels as L
from dpmedtf.data.manifests import cohort_table, detect_modality, load_manifest, patient_wise_split
from dpmedtf.errors import DataError

HEADER = "image_path,patient_id,sex,age," + ",".join(L.FINDINGS)


def write_csv(tmp_path, lines, name="manifest.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def row(path, patient, sex="F", age=50, grades=("0",) * 8, split=None):
    return ",".join([path, patient, sex, str(age), *grades] + ([split] if split else []))


@pytest.mark.parametrize("finding, value, grade, binary", [
    ("cardiomegaly", "normal", 0, 0), ("cardiomegaly", "uncertain", 1, 0), ("cardiomegaly", "borderline", 2, 1),
    ("cardiomegaly", "Massively enlarged", 4, 1), ("congestion", "negative", 0, 0), ("congestion", "MILD", 2, 1),
    ("atelectasis_left", "severe", 4, 1), ("pleural_effusion_right", "3", 3, 1), ("pleural_effusion_right", 1, 1, 0),
    ("pneumonic_infiltrates_left", 2.0, 2, 1),
])
def test_grades_map_to_the_papers_binary_labels(finding, value, grade, binary):
    assert L.parse_grade(finding, value) == grade
    assert L.binary_label(grade) == binary


@pytest.mark.parametrize("finding, value", [("cardiomegaly", "mild"), ("congestion", "enlarged"),
                                            ("congestion", "5"), ("congestion", ""), ("congestion", -1)])
def test_unknown_grades_are_refused(finding, value):
    with pytest.raises(ValueError, match="unknown grade"):
        L.parse_grade(finding, value)


@pytest.mark.parametrize("age, group", [(0, "0-29"), (29.9, "0-29"), (30, "30-59"), (59, "30-59"), (60, "60-69"),
                                        (70, "70-79"), (79.99, "70-79"), (80, "80+"), (100, "80+")])
def test_paper_age_bins(age, group):
    from dpmedtf.data.attributes import bin_label

    assert bin_label(L.AGE_BIN_EDGES, age) == group


def test_valid_manifest_loads_with_paths_relative_to_the_csv(tmp_path):
    path = write_csv(tmp_path, [HEADER + ",split",
                                row("a.png", "P1", "female", 45, ("borderline",) + ("0",) * 7, "train"),
                                row("sub/b.dcm", "P1", "F", 46, ("0",) * 7 + ("moderate",), "training"),
                                row("c.png", "P2", "m", 81, ("1",) * 8, "val")])
    cohort = load_manifest(path, "radiograph")
    frame = cohort.frame
    assert frame["path"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.dcm"), str(tmp_path / "c.png")]
    assert frame["sex"].tolist() == ["F", "F", "M"] and frame["split"].tolist() == ["train", "train", "validation"]
    assert frame["age_group"].tolist() == ["30-59", "30-59", "80+"]
    assert cohort.labels().tolist()[0] == [1, 0, 0, 0, 0, 0, 0, 0] and cohort.labels()[1, 7] == 1
    assert cohort.labels()[2].sum() == 0  # "uncertain" everywhere is negative
    assert frame["line"].tolist() == [2, 3, 4]
    assert not cohort.synthetic
    assert detect_modality(path) == "radiograph"


@pytest.mark.parametrize("lines, fragment", [
    ([HEADER.replace(",congestion", ""), "a.png,P1,F,50" + ",0" * 7], "missing column(s) congestion"),
    ([HEADER, row("a.png", "P1", grades=("0", "bad") + ("0",) * 6)],
     "line 2: unknown grade 'bad' for congestion; use 0–4 or one of: negative, uncertain, mild, moderate, severe"),
    ([HEADER, row("a.png", "P1"), row("b.png", "P2", grades=("",) + ("0",) * 7)],
     "line 3: cardiomegaly is empty; give a value, or set labels.blank"),
    ([HEADER, row("a.png", "P1", age="old")], "line 2: age 'old' is not a number"),
    ([HEADER, row("a.png", "P1", age=130)], "line 2: age '130' is outside 0–120 years"),
    ([HEADER, row("a.png", "")], "line 2: empty patient_id"),
    ([HEADER, row("", "P1")], "line 2: empty image_path"),
    ([HEADER, row("a.png", "P1"), row("a.png", "P2")], "line(s) 2, 3 name the same file"),
    ([HEADER, row("a.png", "P1", "F"), row("b.png", "P1", "M")], "patient 'P1' has different sex values on lines [2, 3]"),
    ([HEADER + ",split", row("a.png", "P1", split="train"), row("b.png", "P1", split="test")],
     "patient 'P1' is in more than one split (line 2 → train, line 3 → test)"),
    ([HEADER + ",split", row("a.png", "P1", split="holdout")], "line 2: unknown split 'holdout'"),
    ([HEADER], "the manifest has no rows"),
    # header problems, each named with its line
    ([HEADER + ",Age", row("a.png", "P1") + ",51"], "line 1: the header names a column more than once ('age' in "
                                                     "columns 4, 13)"),
    ([HEADER + ",split,Split", row("a.png", "P1", split="train") + ",test"], "'split' in columns 13, 14"),
    ([HEADER.replace(",", ";"), row("a.png", "P1").replace(",", ";")],
     "line 1: the header is separated by semicolons (;)"),
    ([HEADER.replace(",", "\t"), row("a.png", "P1").replace(",", "\t")], "line 1: the header is separated by tabs"),
    ([HEADER, row("images/a.png", "P1"), row("images/../images/a.png", "P2")],
     "line(s) 2, 3 name the same file"),
    ([HEADER, row("a.png", "P1"), row("./sub/../a.png", "P2")], "(written as './sub/../a.png', 'a.png')"),
    ([HEADER, row("a.png", "P1")[:-2]], "line 2: 11 field(s) where the header has 12"),
    ([HEADER, row("a.png", "P1"), "", ",,,", row("b.png", "P2", age="old")], "line 5: age 'old' is not a number"),
])
def test_every_bad_manifest_is_refused_naming_file_and_line(tmp_path, lines, fragment):
    path = write_csv(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load_manifest(path, "radiograph")
    assert str(info.value).startswith(str(path)) and fragment in str(info.value), str(info.value)


def test_capitalised_reserved_columns_are_read_as_the_reserved_columns(tmp_path):
    # "Split" once was ignored and the split redone; it is the split column, as Patient_ID and AGE are theirs.
    header = HEADER.replace("patient_id", "Patient_ID").replace("age", "AGE").replace("cardiomegaly", " Cardiomegaly")
    path = write_csv(tmp_path, [header + ",Split", row("a.png", "P1", grades=("borderline",) + ("0",) * 7, split="test"),
                                row("b.png", "P2", age=70, split="train")])
    cohort = load_manifest(path, "radiograph")
    assert cohort.frame["split"].tolist() == ["test", "train"] and not cohort.split_stratified_on_labels
    assert cohort.frame["patient_id"].tolist() == ["P1", "P2"] and cohort.frame["age"].tolist() == [50, 70]
    assert cohort.frame["cardiomegaly"].tolist() == [1, 0]


def test_same_file_through_a_symbolic_link_is_a_duplicate(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    path = write_csv(tmp_path, [HEADER, row("images/a.png", "P1"), row(str(tmp_path / "alias" / "a.png"), "P2")])
    with pytest.raises(DataError, match=r"line\(s\) 2, 3 name the same file .*images/a.png"):
        load_manifest(path, "radiograph")


@pytest.mark.parametrize("content, fragments", [
    ((HEADER + "\n" + row("a.png", "P1") + "\n" + row("b.png", "Müller") + "\n").encode("latin-1"),
     ["line 3: not a readable CSV manifest: byte 0xFC at column 8 is not UTF-8", "Latin-1", "Save the manifest as UTF-8"]),
    ((HEADER + "\n" + row("a.png", "P1") + "\n").encode("utf-16"), ["UTF-16", "save it as UTF-8"]),
    (("\ufeff" + HEADER + "\n" + row("a.png", "P1") + "\n").encode("utf-8"), None),  # Excel's UTF-8 BOM is fine
])
def test_encoding_problems_name_the_line_and_the_fix(tmp_path, content, fragments):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    if fragments is None:
        assert load_manifest(path, "radiograph").frame["patient_id"].tolist() == ["P1"]
        return
    for load in (lambda: load_manifest(path, "radiograph"), lambda: detect_modality(path)):
        with pytest.raises(DataError) as info:
            load()
        assert str(info.value).startswith(str(path)), str(info.value)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)


def test_all_bad_rows_are_listed_together(tmp_path):
    path = write_csv(tmp_path, [HEADER] + [row(f"{i}.png", f"P{i}", age="?!") for i in range(25)])
    message = str(pytest.raises(DataError, load_manifest, path, "radiograph").value)
    assert "25 invalid row(s)" in message and "line 2:" in message and "… and 5 more" in message


def test_missing_manifest_file(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "none.csv", "radiograph")


def synthetic_frame(n_patients=400, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        for i in range(int(rng.integers(1, 5))):
            records.append({"patient_id": f"P{p}", "path": f"{p}_{i}",
                            **{f: int(rng.random() < prevalence) for f, prevalence in
                               zip(L.FINDINGS, (0.45, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.02))}})
    return pd.DataFrame(records)


def test_patient_wise_split_is_deterministic_leak_free_and_stratified():
    frame = synthetic_frame()
    split = patient_wise_split(frame, L.FINDINGS, (0.7, 0.1, 0.2), seed=7)
    assert split.equals(patient_wise_split(frame, L.FINDINGS, (0.7, 0.1, 0.2), seed=7))
    assert not split.equals(patient_wise_split(frame, L.FINDINGS, (0.7, 0.1, 0.2), seed=8))
    assert (frame.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    images = split.value_counts(normalize=True)
    for name, fraction in zip(("train", "validation", "test"), (0.7, 0.1, 0.2)):
        assert images[name] == pytest.approx(fraction, abs=0.03)
        part = frame[split == name]
        for finding in L.FINDINGS:
            share = part[finding].sum() / frame[finding].sum()
            # Every split gets close to its share of every finding's positives, the rarest included.
            assert share == pytest.approx(fraction, abs=0.06 if frame[finding].sum() > 50 else 0.12), (name, finding)


def test_manifest_without_split_column_is_split_patient_wise(synthetic_cohort):
    cohort = load_manifest(synthetic_cohort["radiograph"], "radiograph", split_seed=1)
    assert set(cohort.frame["split"]) == {"train", "validation", "test"}
    assert (cohort.frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert cohort.synthetic


def test_cohort_table_counts(synthetic_cohort):
    cohort = load_manifest(synthetic_cohort["radiograph"], "radiograph")
    table = cohort_table(cohort)
    f = cohort.frame
    assert table.loc["images", "total"] == len(f)
    assert table.loc["patients", "train"] == f[f.split == "train"].patient_id.nunique()
    assert table.loc["sex F", "test"] == ((f.split == "test") & (f.sex == "F")).sum()
    assert table.loc["cardiomegaly positive", "total"] == f["cardiomegaly"].sum()
    assert sum(table.loc[f"age {g}", "total"] for g in f["age_group"].unique()) == len(f)


def test_ct_manifest_labels_and_age_quartiles(synthetic_cohort, tmp_path):
    cohort = load_manifest(synthetic_cohort["volume"], "volume")
    assert cohort.label_names == ("label",) and set(cohort.frame["label"]) <= {0, 1}
    groups = cohort.frame["age_group"]
    assert groups.str.match(r"^Q[1-4] ").all() and groups.nunique() <= 4
    bad = write_csv(tmp_path, ["volume_path,patient_id,sex,age,label", "v.nii.gz,C1,F,60,maybe"], "ct.csv")
    with pytest.raises(DataError, match="line 2: unknown label 'maybe'; use 0 or 1"):
        load_manifest(bad, "volume")
    assert detect_modality(bad) == "volume"


def test_chexpert_manifest_with_more_sexes_and_any_attribute(tmp_path):
    from dpmedtf.data import attributes, label_sets

    columns = label_sets.CHEXPERT_COLUMNS
    header = "image_path,patient_id,sex,age,site,race," + ",".join(f'"{c}"' for c in columns)
    cells = ["1.0", "-1.0", ""] + ["0.0"] * (len(columns) - 3)
    lines = [header,
             ",".join(["a.jpg", "P1", "Female", "64", "site-A", "group-1", *cells]),
             ",".join(["b.jpg", "P2", "diverse", "", "site-B", "", *cells]),
             ",".join(["c.jpg", "P3", "", "81", "", "group-2", *cells]),
             ",".join(["d.jpg", "P1", "unknown", "65", "site-A", "group-1", *cells])]  # P1's sex unknown here: no conflict
    path = write_csv(tmp_path, lines)
    spec = attributes.FairnessSpec(attributes=(attributes.attribute("sex"), attributes.attribute("age"),
                                               attributes.attribute("site"), attributes.attribute("race")),
                                   intersections=(attributes.Intersection(first="race", second="sex"),))
    cohort = load_manifest(path, "radiograph", label_set=label_sets.preset("chexpert"), fairness=spec)
    frame = cohort.frame
    assert frame["sex"].tolist() == ["F", "other", "unknown", "unknown"]
    assert frame["age_group"].tolist() == ["60-69", "unknown", "80+", "60-69"]
    assert frame["site"].tolist() == ["site-A", "site-B", "unknown", "site-A"]
    assert frame["race"].tolist() == ["group-1", "unknown", "group-2", "group-1"]
    labels = cohort.labels()
    assert labels[0, 0] == 1.0 and np.isnan(labels[0, 1]) and labels[0, 2] == 0.0  # uncertain ignored, blank 0
    table = cohort_table(cohort)
    assert table.loc["sex other", "total"] == 1 and table.loc["site unknown", "total"] == 1
    assert table.loc["enlarged_cardiomediastinum not observed", "total"] == 4

    required = attributes.FairnessSpec(attributes=(attributes.attribute("sex"),
                                                   attributes.attribute("site", required=True)))
    with pytest.raises(DataError, match="line 4: site '' is missing or not recognised, and fairness.attributes marks "
                                        "site required"):
        load_manifest(path, "radiograph", label_set=label_sets.preset("chexpert"), fairness=required)
    absent = attributes.FairnessSpec(attributes=(attributes.attribute("insurance"),))
    with pytest.raises(DataError, match="fairness.attributes names column\\(s\\) insurance, which the manifest does not"):
        load_manifest(path, "radiograph", label_set=label_sets.preset("chexpert"), fairness=absent)
    with pytest.raises(DataError, match="missing column\\(s\\) congestion.*the label set 'uka-cxr'; its header has the CheXpert observations: set labels: chexpert"):
        load_manifest(path, "radiograph")


def test_a_ct_manifest_may_carry_several_labels(tmp_path):
    from dpmedtf.config import LabelsConfig, config_from_mapping
    from dpmedtf.data import label_sets

    path = write_csv(tmp_path, ["volume_path,patient_id,sex,age,tumour,Metastasis",
                                "a.nii.gz,P1,M,70,1,no", "b.nii.gz,P2,F,55,0,yes", "c.nii.gz,P3,F,60,1,"])
    config = config_from_mapping({"findings": [{"name": "tumour"}, {"name": "metastasis", "column": "metastasis",
                                                                    "blank": "ignore"}]}, LabelsConfig)
    cohort = load_manifest(path, "volume", label_set=label_sets.from_config(config, "volume"))
    assert cohort.label_names == ("tumour", "metastasis")  # the header's capital M matched regardless
    np.testing.assert_array_equal(cohort.labels(), [[1, 0], [0, 1], [1, np.nan]])
