"""The run folder's files and the provenance in env.json, checked against their own sources.

The file formats are checked on hand-written examples (the exact text a reader sees). The git
provenance (commit, dirty files, training-code digest) is checked in a throwaway repository
built in tmp_path with the checkout's layout: ``lehi.record.REPO`` (the checkout git runs
in) is pointed at it, and the working directory is a folder outside any repository, so git
only answers from where record.py says it looks. The machine fields are compared with what
the machine itself reports (/proc/cpuinfo, torch, platform, socket).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lehi import record
from lehi.record import METRIC_COLUMNS, RunRecord

# ----------------------------------------------------------------------------- git fixtures
FILES = {
    "lehi/model.py": "x = 1\n",
    "lehi/results/table.py": "t = 1\n",
    "lehi/diagnostics/study.py": "d = 1\n",
    "conf/config.yaml": "seed: 0\n",
    "experiments/a.yaml": "name: a\n",
    "experiments/b.yaml": "name: b\n",
    "run.py": "print()\n",
    "README.md": "readme\n",
    "plots/plot.py": "p = 1\n",
    "plots/figures/fig.txt": "figure\n",
    "results/a/summary.json": "{}\n",
}


def _git(repo: Path, *args: str) -> str:
    """``git <args>`` in ``repo`` (a fixture's own git call, independent of record.git)."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _write(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)


def _commit(repo: Path, files: dict[str, str], message: str = "change") -> str:
    _write(repo, files)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A committed checkout with the project's layout, which record.git runs in."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _commit(root, FILES, "first")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not a repository: git must run in REPO, not here
    monkeypatch.setattr(record, "REPO", root)
    return root


@pytest.fixture
def no_repo(tmp_path, monkeypatch):
    """record.git pointed at a folder that no git repository holds."""
    folder = tmp_path / "plain"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(record, "REPO", folder)
    return folder


# ----------------------------------------------------------------------------- git
def test_git_answers_from_the_checkout_with_its_output_stripped(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}\n", head)
    assert record.git("rev-parse", "HEAD") == head[:-1]
    assert record.git("log", "-1", "--format=%s") == "first"
    assert record.git("rev-parse", "no-such-ref") is None  # git fails: None, not its output


def test_git_is_none_outside_a_repository(no_repo):
    assert record.git("rev-parse", "HEAD") is None
    assert record.dirty_files() is None


def test_dirty_files_lists_changed_tracked_files_and_untracked_training_code(repo):
    assert record.dirty_files() == []
    _write(
        repo,
        {
            # tracked and changed: dirty, wherever they are outside results/ and plots/figures/
            "lehi/model.py": "x = 2\n",
            "lehi/results/table.py": "t = 2\n",
            "README.md": "changed\n",
            "results/a/summary.json": '{"a": 1}\n',
            "plots/figures/fig.txt": "new figure\n",
            # untracked: dirty only in the training code (lehi minus analysis, conf, presets)
            "lehi/new.py": "n = 1\n",
            "conf/extra.yaml": "e: 1\n",
            "experiments/c.yaml": "name: c\n",
            "lehi/results/new.py": "r = 1\n",
            "lehi/diagnostics/new.py": "d = 2\n",
            "plots/new.py": "q = 1\n",
            "results/b/summary.json": "{}\n",
            "notes.txt": "scratch\n",
        },
    )
    assert record.dirty_files() == [
        "README.md",
        "conf/extra.yaml",
        "experiments/c.yaml",
        "lehi/model.py",
        "lehi/new.py",
        "lehi/results/table.py",
    ]


def test_dirty_files_sees_a_change_outside_the_training_code(repo):
    """A changed tracked file outside the training code alone (README) makes the checkout dirty."""
    (repo / "README.md").write_text("changed\n")
    assert record.dirty_files() == ["README.md"]


# ----------------------------------------------------------------------------- digest
def test_training_code_pathspecs():
    analysis = (":!lehi/results", ":!lehi/diagnostics", ":!plots")
    assert record.training_code() == ("lehi", "conf", "experiments", "run.py", *analysis)
    assert record.training_code("ptb_small") == (
        "lehi",
        "conf",
        "experiments/ptb_small.yaml",
        "run.py",
        *analysis,
    )


def _listing_digest(repo: Path, commit: str, paths: tuple[str, ...]) -> str:
    """SHA-256 (16 hex digits) of ``git ls-tree -r`` of the training code, one line a blob."""
    lines = _git(repo, "ls-tree", "-r", commit, "--", *paths).splitlines()
    kept = [
        line
        for line in lines
        if not line.split("\t")[1].startswith(("lehi/results/", "lehi/diagnostics/"))
    ]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def test_training_code_digest_is_the_digest_of_the_training_blobs(repo):
    """The digest is stored in verification records and compared with HEAD's later: its
    formula is part of the format."""
    head = _git(repo, "rev-parse", "HEAD").strip()
    every = ("lehi", "conf", "experiments", "run.py")
    assert record.training_code_digest() == _listing_digest(repo, head, every)
    assert record.training_code_digest(head) == record.training_code_digest()
    own = ("lehi", "conf", "experiments/a.yaml", "run.py")
    assert record.training_code_digest(experiment="a") == _listing_digest(repo, head, own)
    assert record.training_code_digest("no-such-commit") is None


def test_training_code_digest_changes_with_training_code_only(repo):
    first = _git(repo, "rev-parse", "HEAD").strip()
    digest, digest_a = record.training_code_digest(), record.training_code_digest(experiment="a")
    assert digest != digest_a
    analysis_only = _commit(
        repo,
        {
            "README.md": "new readme\n",
            "lehi/results/table.py": "t = 3\n",
            "lehi/diagnostics/study.py": "d = 3\n",
            "plots/plot.py": "p = 3\n",
            "results/a/summary.json": '{"b": 2}\n',
        },
    )
    assert record.training_code_digest(analysis_only) == digest
    assert record.training_code_digest() == digest
    other_preset = _commit(repo, {"experiments/b.yaml": "name: b2\n"})
    assert record.training_code_digest(other_preset) != digest
    assert record.training_code_digest(other_preset, experiment="a") == digest_a
    own_preset = _commit(repo, {"experiments/a.yaml": "name: a2\n"})
    assert record.training_code_digest(own_preset, experiment="a") != digest_a
    code = _commit(repo, {"lehi/model.py": "x = 3\n"})
    assert record.training_code_digest(code) not in (
        record.training_code_digest(own_preset),
        digest,
    )
    assert record.training_code_digest(first) == digest


# ----------------------------------------------------------------------------- env.json
ENV_KEYS = {
    "git_commit",
    "git_dirty",
    "dirty_files",
    "torch",
    "cuda",
    "cudnn",
    "device",
    "device_name",
    "cpu",
    "cpu_capability",
    "gpu",
    "num_threads",
    "hostname",
    "python",
    "platform",
    "time",
}


def _cpu_model_from_proc() -> str | None:
    """The first ``model name`` of /proc/cpuinfo, None where there is none (non-x86, non-Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^model name\s*:\s*(.*?)\s*$", text, re.MULTILINE)
    return found.group(1) if found else None


def _architecture() -> str:
    return platform.processor() or os.uname().machine


def test_machine_reports_cpu_model_capability_torch_and_gpu():
    m = record.machine()
    assert set(m) == {"cpu", "cpu_capability", "torch", "gpu"}
    assert m["cpu"] == (_cpu_model_from_proc() or _architecture())
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch"] == torch.__version__
    assert m["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_environment_of_a_dirty_checkout_on_cpu(repo, tmp_path):
    many = {f"lehi/m{i:02d}.py": f"m = {i}\n" for i in range(25)}
    _write(repo, many)
    before = datetime.datetime.now(datetime.timezone.utc)
    env = record.environment(torch.device("cpu"))
    assert set(env) == ENV_KEYS
    assert env["git_commit"] == _git(repo, "rev-parse", "HEAD").strip()
    assert env["git_dirty"] is True
    assert env["dirty_files"] == [f"lehi/m{i:02d}.py" for i in range(20)]  # the first 20
    assert env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    assert env["cudnn"] == cudnn
    assert env["device"] == "cpu"
    assert env["device_name"] == _architecture()
    assert env["cpu"] == (_cpu_model_from_proc() or _architecture())
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert env["num_threads"] == torch.get_num_threads()
    assert env["hostname"] == os.uname().nodename == socket.gethostname()
    assert env["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert env["platform"] == platform.platform()
    stamp = datetime.datetime.strptime(env["time"], "%Y-%m-%dT%H:%M:%S%z")
    assert (
        before - datetime.timedelta(seconds=1)
        <= stamp
        <= datetime.datetime.now(datetime.timezone.utc)
    )
    folder = RunRecord(tmp_path / "run")
    folder.write_env(env)
    assert folder.read_env() == env


def test_environment_of_a_clean_checkout_and_outside_any_repository(repo, tmp_path, monkeypatch):
    env = record.environment(torch.device("cpu"))
    assert (env["git_dirty"], env["dirty_files"]) == (False, [])
    (repo / "lehi" / "model.py").write_text("x = 5\n")
    env = record.environment(torch.device("cpu"))
    assert (env["git_dirty"], env["dirty_files"]) == (True, ["lehi/model.py"])
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    monkeypatch.setattr(record, "REPO", plain)
    env = record.environment(torch.device("cpu"))
    assert (env["git_commit"], env["git_dirty"], env["dirty_files"]) == (None, None, [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_environment_on_a_cuda_device_names_the_gpu(repo):
    """The last GPU, so that a name looked up for the current device (0) would differ."""
    index = torch.cuda.device_count() - 1
    env = record.environment(torch.device("cuda", index))
    assert env["device"] == f"cuda:{index}"
    assert env["device_name"] == torch.cuda.get_device_properties(index).name
    assert env["gpu"] == torch.cuda.get_device_properties(torch.cuda.current_device()).name
    assert env["cudnn"] is not None
    assert env["cudnn"] == torch.backends.cudnn.version()


# ----------------------------------------------------------------------------- run files
def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_repr_names_the_folder(tmp_path):
    assert repr(RunRecord(tmp_path / "run")) == f"RunRecord('{tmp_path / 'run'}')"


def test_config_yaml_keeps_key_order_and_readable_unicode(tmp_path):
    folder = RunRecord(tmp_path / "run")
    config = {"seed": 0, "optimizer": {"name": "lehi", "label": "λ-lehi", "lr": 0.001}, "alpha": 1}
    folder.write_config(config)
    assert folder.config.read_text(encoding="utf-8") == (
        "seed: 0\noptimizer:\n  name: lehi\n  label: λ-lehi\n  lr: 0.001\nalpha: 1\n"
    )
    assert folder.read_config() == config
    assert _temp_files(folder.dir) == []


def test_json_files_are_indented_strict_json_with_non_finite_as_null(tmp_path):
    folder = RunRecord(tmp_path / "run")
    data = {"loss": math.nan, "best": {"metric": math.inf, "curve": [1.5, -math.inf]}, "n": 2}
    expected_text = (
        "{\n"
        '  "loss": null,\n'
        '  "best": {\n'
        '    "metric": null,\n'
        '    "curve": [\n'
        "      1.5,\n"
        "      null\n"
        "    ]\n"
        "  },\n"
        '  "n": 2\n'
        "}\n"
    )
    expected = {"loss": None, "best": {"metric": None, "curve": [1.5, None]}, "n": 2}
    assert record.json_safe(data) == expected
    folder.write_summary(data)
    folder.write_env(data)
    for path in (folder.summary, folder.env):
        assert path.read_text() == expected_text
    assert folder.read_summary() == expected
    assert folder.read_env() == expected
    assert _temp_files(folder.dir) == []


def test_env_is_none_until_written(tmp_path):
    folder = RunRecord(tmp_path / "run")
    assert folder.read_env() is None
    folder.write_env({"git_commit": "abc"})
    assert folder.read_env() == {"git_commit": "abc"}


def test_metrics_csv_text_and_round_trip(tmp_path):
    folder = RunRecord(tmp_path / "run")
    rows = [
        {
            "step": 10,
            "epoch": 0.5,
            "split": "train",
            "loss": 2.25,
            "metric": None,
            "lr": 0.1,
            "wall_time": 1.5,
            "train_time": 1.25,
            "curvature_passes": 3,
        },
        {"step": 20, "epoch": 1.0, "split": "val", "loss": math.nan, "metric": math.inf},
    ]
    folder.write_metrics(rows)
    assert folder.metrics.read_bytes() == (
        b"step,epoch,split,loss,metric,lr,wall_time,train_time,curvature_passes\n"
        b"10,0.5,train,2.25,,0.1,1.5,1.25,3\n"
        b"20,1.0,val,nan,inf,,,,\n"
    )
    back = folder.read_metrics()
    assert back[0] == rows[0]
    assert math.isnan(back[1]["loss"])
    assert {k: back[1][k] for k in METRIC_COLUMNS if k != "loss"} == {
        "step": 20,
        "epoch": 1.0,
        "split": "val",
        "metric": math.inf,
        "lr": None,
        "wall_time": None,
        "train_time": None,
        "curvature_passes": None,
    }
    assert _temp_files(folder.dir) == []


def test_stale_temp_files_go_and_the_run_files_stay(tmp_path):
    folder = RunRecord(tmp_path / "run")
    folder.write_config({"seed": 0})
    folder.write_env({"torch": "x"})
    folder.write_metrics([{"step": 1, "split": "train", "loss": 1.0}])
    folder.write_summary({"status": "completed"})
    stale = [".metrics.csv.k3j2_x.tmp", ".summary.json.abc.tmp", ".checkpoint.pt.q.tmp"]
    for name in stale:
        (folder.dir / name).write_text("half written")
    (folder.dir / "notes.tmp").write_text("not a writer's temp file")
    folder.remove_stale_temp_files()
    names = sorted(p.name for p in folder.dir.iterdir())
    assert names == ["config.yaml", "env.json", "metrics.csv", "notes.tmp", "summary.json"]
    assert folder.read_summary() == {"status": "completed"}
    (folder.dir / stale[0]).write_text("half written")
    folder.clear()
    names = sorted(p.name for p in folder.dir.iterdir())
    assert names == ["config.yaml", "env.json", "notes.tmp"]
