"""Data sources beyond one local file: globs and directories of shards, `save_to_disk` directories, `.arrow`
files and hub datasets through the Hugging Face cache (`datasets`). No network: every test runs with
HF_HUB_OFFLINE=1 (conftest) and its own HF_HOME / HF_DATASETS_CACHE under tmp_path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from datasets.packaged_modules.json.json import Json
from helpers import ROOT, base_config, ftl, reverse_rows, write_config, write_jsonl
from transformers import AutoTokenizer

from launcher.cli import main
from launcher.config import Config
from launcher.data import read_splits, tokenize_split

SUBSETS = {"plain": 0, "other": 1}  # subset name -> seed of its rows
SPLIT_SIZES = {"train": 12, "test": 4}


def _hub_rows(subset: str, split: str) -> list[dict]:
    return reverse_rows(SPLIT_SIZES[split], seed=10 * SUBSETS[subset] + len(split), fmt="completion")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HF_DATASETS_CACHE holding the dataset `owner/name` (subsets plain and other, splits train and test)
    laid out as `datasets` 5.2 leaves a downloaded hub set:
    `<cache>/owner___name/<subset>/0.0.0/<hash>/{name-train.arrow, name-test.arrow, dataset_info.json}`.

    How it is made without the hub: the packaged Json builder, given local data files, `dataset_name="name"`,
    `config_name`/`config_id` = the subset and a fixed `hash`, prepares `<build>/name/<subset>/0.0.0/<hash>/`;
    that folder is moved to `<cache>/owner___name`. (Giving the builder `repo_id="owner/name"` instead is refused:
    it wants data files under `hf://datasets/owner/name@...`.) Offline, `load_dataset("owner/name", name=subset,
    split=...)` cannot reach the hub and falls back to the latest cached copy (its CachedDatasetModuleFactory and
    the `cache` packaged module), which reads exactly this layout."""
    root = tmp_path_factory.mktemp("hub")
    build, cache = root / "build", root / "cache"
    for subset in SUBSETS:
        files = {
            split: [str(write_jsonl(root / f"{subset}-{split}.jsonl", _hub_rows(subset, split)))]
            for split in SPLIT_SIZES
        }
        builder = Json(
            cache_dir=str(build),
            dataset_name="name",
            config_name=subset,
            config_id=subset,
            hash="0123abcd",
            data_files=files,
        )
        builder.download_and_prepare()
    cache.mkdir()
    shutil.move(build / "name", cache / "owner___name")
    return cache


@pytest.fixture
def hf_env(tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's Hugging Face environment: the laid-out cache, a throwaway HF_HOME, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _cfg(tmp_path: Path, model: Path, train: object, **data: object) -> Config:
    raw = base_config(tmp_path, model, Path("unused"), data={"format": "completion", **data})
    raw["data"]["train"] = train
    return Config.model_validate(raw)


def _validate(tmp_path: Path, model: Path, train: object, capsys: pytest.CaptureFixture[str], **data: object) -> str:
    """`ftl validate` in process; its stderr (exit code 2 asserted)."""
    raw = base_config(tmp_path, model, Path("unused"), data={"format": "completion", **data})
    raw["data"]["train"] = train
    cfg = write_config(tmp_path / "cfg.yaml", raw)
    capsys.readouterr()  # what the test's own set-up printed (datasets' progress bars)
    code = main(["validate", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ftl: invalid input:") and "Traceback" not in err, err[-2000:]
    return err


def _shards(d: Path, rows: list[dict], sizes: list[int], suffix: str = "parquet") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = d / f"part-{i}.{suffix}"
        if suffix == "parquet":
            pq.write_table(pa.Table.from_pylist(rows[start : start + n]), path)
        else:
            write_jsonl(path, rows[start : start + n])
        paths.append(path)
        start += n
    return paths


def test_glob_and_directory_of_shards_train_like_one_file(tmp_path: Path, models: dict) -> None:
    """Three Parquet shards, given as a glob and as their directory, tokenise to exactly the tokens of the same
    rows in one JSONL file (the shards are read in name order)."""
    rows = reverse_rows(20, seed=4, fmt="chat")
    _shards(tmp_path / "shards", rows, [7, 7, 6])
    one = write_jsonl(tmp_path / "all.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(models["llama"])
    samples = {}
    for name, train in {
        "file": str(one),
        "glob": str(tmp_path / "shards/*.parquet"),
        "dir": str(tmp_path / "shards"),
    }.items():
        cfg = _cfg(tmp_path, models["llama"], train, format="chat")
        raw = read_splits(cfg)
        samples[name] = tokenize_split(raw.train, cfg, tok, "data.train", build=True)
        assert raw.origins["data.train"][1] == 20
    for name in ("glob", "dir"):
        assert [list(x) for x in samples[name].input_ids] == [list(x) for x in samples["file"].input_ids]
        assert [list(x) for x in samples[name].labels] == [list(x) for x in samples["file"].labels]
    assert (
        read_splits(_cfg(tmp_path, models["llama"], str(tmp_path / "shards/*.parquet"), format="chat"))
        .origins["data.train"][0]
        .endswith("(3 files)")
    )


def test_messages_come_back_as_written_through_arrow(tmp_path: Path, models: dict) -> None:
    """Arrow gives every message (and every tool call) the union of the keys: `tool_calls: None` on turns that had
    none, which a chat template would see as defined. Rows read from Parquet equal the rows written."""
    fn = {"name": "add", "arguments": '{"a": 1}'}
    rows = [
        {
            "messages": [
                {"role": "user", "content": "1+1?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": fn}],
                },
                {"role": "tool", "content": "2"},
                {"role": "assistant", "content": "2"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": fn}]},
            ]
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "calls.parquet")
    arrow = pq.read_table(tmp_path / "calls.parquet").to_pylist()
    assert arrow[2]["messages"][0]["tool_calls"] is None and arrow[1]["messages"][1]["tool_calls"][0]["id"] is None
    got = read_splits(_cfg(tmp_path, models["llama"], str(tmp_path / "calls.parquet"), format="chat")).train
    assert got == rows


def test_bad_row_in_second_shard_is_named(tmp_path: Path, models: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """The message names the shard and the line (JSONL) or row (Parquet)."""
    rows = reverse_rows(6, seed=2)
    rows[4] = {"prompt": "no completion"}
    _shards(tmp_path / "jsonl", rows, [3, 3], suffix="jsonl")
    err = _validate(tmp_path, models["llama"], str(tmp_path / "jsonl/*.jsonl"), capsys)
    assert f"data.train: {tmp_path / 'jsonl/part-1.jsonl'} line 2: missing field(s) completion" in err
    _shards(tmp_path / "pq", rows, [3, 3])
    err = _validate(tmp_path, models["llama"], str(tmp_path / "pq"), capsys)
    assert f"data.train: {tmp_path / 'pq/part-1.parquet'} row 2: missing field(s) completion" in err


def test_save_to_disk_and_arrow_files(tmp_path: Path, models: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A saved Dataset, a saved DatasetDict (train by default for data.train; data.eval names its split) and an
    .arrow file read the rows saved; a DatasetDict without a split for data.eval is refused, listing its splits."""
    train, test = reverse_rows(10, seed=5), reverse_rows(3, seed=6)
    Dataset.from_list(train).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (str(tmp_path / "saved"), str(tmp_path / "dd"), str(arrow)):
        assert read_splits(_cfg(tmp_path, models["llama"], source)).train == train
    cfg = _cfg(tmp_path, models["llama"], str(tmp_path / "dd"), eval={"path": str(tmp_path / "dd"), "split": "test"})
    assert read_splits(cfg).eval == test
    err = _validate(tmp_path, models["llama"], str(tmp_path / "saved"), capsys, eval=str(tmp_path / "dd"))
    assert f"data.eval: {tmp_path / 'dd'} is a DatasetDict with splits train, test; name one" in err


def test_hub_dataset_from_the_cache_with_split_and_subset(tmp_path: Path, models: dict, hf_env: Path) -> None:
    """`{path: owner/name, subset, split}` reads that subset's split from the laid-out cache, offline; data.train
    without a split reads `train`; tasks of a multi-task list take the same forms."""
    source = {"path": "owner/name", "subset": "other", "split": "test"}
    raw = read_splits(_cfg(tmp_path, models["llama"], source, eval=dict(source, split="train")))
    assert raw.train == _hub_rows("other", "test") and raw.eval == _hub_rows("other", "train")
    assert raw.origins["data.train"] == ("owner/name subset other split test (Hugging Face cache)", 4)
    plain = read_splits(_cfg(tmp_path, models["llama"], {"path": "owner/name", "subset": "plain"}))
    assert plain.train == _hub_rows("plain", "train")
    tasks = [{"path": "owner/name", "subset": "plain", "name": "a"}, dict(source, name="b")]
    mixed = read_splits(_cfg(tmp_path, models["llama"], tasks))
    assert mixed.train == _hub_rows("plain", "train") + _hub_rows("other", "test") and mixed.train_parts == [12, 4]


def test_local_dataset_directory(tmp_path: Path, models: dict, hf_env: Path) -> None:
    """A dataset directory laid out as a hub repository: split files found by name (data/train-*, data/test-*),
    and a subset declared in its README read through `datasets.load_dataset`."""
    repo = tmp_path / "repo"
    train, test, extra = reverse_rows(8, seed=7), reverse_rows(3, seed=8), reverse_rows(5, seed=9)
    _shards(repo / "data", train, [4, 4])
    for i in range(2):
        (repo / "data" / f"part-{i}.parquet").rename(repo / "data" / f"train-0000{i}-of-00002.parquet")
    # datasets reads one file type per repository
    pq.write_table(pa.Table.from_pylist(test), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "extra").mkdir()
    pq.write_table(pa.Table.from_pylist(extra), repo / "extra" / "rows.parquet")
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
    card += "  - split: test\n    path: data/test-*\n- config_name: extra\n  data_files:\n  - split: train\n"
    (repo / "README.md").write_text(card + "    path: extra/*.parquet\n---\n")
    cfg = _cfg(tmp_path, models["llama"], str(repo), eval={"path": str(repo), "split": "test"})
    raw = read_splits(cfg)
    assert raw.train == train and raw.eval == test
    assert read_splits(_cfg(tmp_path, models["llama"], {"path": str(repo), "subset": "extra"})).train == extra


def test_hub_dataset_not_cached_offline_exits_2(
    tmp_path: Path, models: dict, hf_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _validate(tmp_path, models["llama"], {"path": "owner/missing", "split": "train"}, capsys)
    assert "data.train: owner/missing split train: no such local path, and not in the Hugging Face cache" in err
    assert str(hf_env) in err and "HF_HUB_OFFLINE=1" in err
    err = _validate(tmp_path, models["llama"], {"path": "owner/name", "subset": "plain", "split": "dev"}, capsys)
    assert "data.train: owner/name subset plain split dev: Unknown split" in err


def test_validate_reads_hub_and_saved_sets_without_torch(tmp_path: Path, models: dict, hf_env: Path) -> None:
    Dataset.from_list(reverse_rows(4, seed=3)).save_to_disk(str(tmp_path / "saved"))
    raw = base_config(tmp_path, models["llama"], tmp_path / "saved")
    raw["data"]["eval"] = {"path": "owner/name", "subset": "plain", "split": "test"}
    cfg = write_config(tmp_path / "cfg.yaml", raw)
    code = (
        "import sys; from launcher.cli import main; code = main(['validate', sys.argv[1]]); "
        "assert code == 0, code; assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_start_line_names_each_split_source(tmp_path: Path, models: dict, hf_env: Path) -> None:
    """A real run from a hub set: the start line says where each split came from, rows read and kept."""
    raw = base_config(tmp_path, models["llama"], Path("unused"), train={"max_steps": 1})
    raw["data"].update(train={"path": "owner/name", "subset": "plain"}, eval_fraction=0.25)
    res = ftl("train", str(write_config(tmp_path / "cfg.yaml", raw)), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = "data.train: 12 rows read, 9 kept (3 held out as data.eval); from owner/name subset plain split train"
    assert line in res.stderr, res.stderr[-3000:]
    assert "data.eval: 3 rows read, 3 kept; from data.eval_fraction=0.25 of data.train" in res.stderr
