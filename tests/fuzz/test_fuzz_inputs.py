"""Property-based tests (Hypothesis) of every input a user hands raysim: config files, `-o`
overrides, partition files and run directories to resume. Whatever the input, the outcome is a
completed validation or preparation, or one `raysim: error:` line with exit code 2 that a
check of raysim's wrote (not the catch-all for errors no check foresaw); nothing is written
outside the example's own folder, and an earlier run's files stay as they were.

Examples are few and small and drawn from a fixed seed (`derandomize`), so CI is reproducible
and the whole module takes seconds. No Ray starts: validation and preparation answer first,
and a valid input stops before the rounds (`raysim config`, `raysim partition`,
`prepare_resume`)."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, in_one_process, small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysim.cli.main import main
from raysim.config import ConfigError, config_to_dict, dump_config
from raysim.results.sinks import RunDirectory
from raysim.run import execute, prepare, prepare_resume
from raysim.run.checkpoints import MANIFEST, checkpoint_rounds
from raysim.run.validate import load_config

FUZZ = settings(max_examples=25, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SHIPPED = ["yaml/quickstart.yaml", "yaml/digits_a0.1/scaffold.yaml",
           "yaml/synthetic_fedprox/fedprox.yaml", "yaml/digits_domains/fpl.yaml"]
_counter = itertools.count()


def tree_hash(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` (links not followed) with its contents' hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"link {os.readlink(path)}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


class Sandbox:
    """A folder per example (the only place an example may write), the working directory set
    to an empty folder (a default run directory would land there), and an earlier run that
    must stay as it was."""

    def __init__(self, root: Path, earlier: Path) -> None:
        self.root, self.earlier = root, earlier
        self.cwd = root / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self.earlier_hash = tree_hash(earlier)

    def example(self) -> Path:
        work = self.root / f"example-{next(_counter)}"
        work.mkdir()
        return work

    def check(self, work: Path) -> None:
        assert tree_hash(self.earlier) == self.earlier_hash, "an earlier run's files changed"
        assert not any(self.cwd.iterdir()), "written to the working directory"
        outside = {p.name for p in self.root.iterdir()} - {"cwd"}
        assert all(name.startswith("example-") for name in outside), outside
        shutil.rmtree(work)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A run of two rounds with a checkpoint after each (local backend: no Ray)."""
    run_dir = tmp_path_factory.mktemp("earlier") / "run"
    config = in_one_process(small_config(**{"rounds": 2, "checkpoint.every": 1,
                                            "checkpoint.keep": 2, "clients_per_round": 2}))
    summary = execute(prepare(config, run_dir), [RunDirectory(run_dir)])
    assert summary.status == "completed" and len(checkpoint_rounds(run_dir)) == 2
    return run_dir


@pytest.fixture
def sandbox(tmp_path, earlier_run, monkeypatch) -> Sandbox:
    box = Sandbox(tmp_path, earlier_run)
    monkeypatch.chdir(box.cwd)
    return box


def cli(capsys, *argv: str) -> int:
    """`raysim ARGV` in this process: exit 0, or 2 with one error line that a check wrote."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    if code == 0:
        assert not [line for line in lines if line.startswith("raysim: error:")], err
        return code
    assert code == 2, (code, err)
    errors = [line for line in lines if line.startswith("raysim: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith("raysim: warning:") for line in lines[:-1]), err
    # the catch-all line means no check foresaw this input: fix the check, not the test
    assert "--debug" not in errors[0], errors[0]
    return code


# ----------------------------------------------------------------------------- config files

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18),
    st.integers(max_value=-(10**18)), st.floats(), st.floats(min_value=1e300),
    st.text(max_size=12), st.sampled_from(["1e400", "-0", "nan", ".inf", "~", "[]", "{}"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def leaves(raw: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.extend(leaves(value, (*prefix, key)))
        else:
            out.append((*prefix, key))
    return out


def resolved(path: str) -> dict:
    return config_to_dict(load_config(ROOT / path))


def set_path(raw: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        raw = raw[key]
    raw[path[-1]] = value


def write(work: Path, data: bytes | str, name: str = "config.yaml") -> str:
    path = work / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_config_file(sandbox, capsys, data):
    work = sandbox.example()
    cli(capsys, "config", write(work, data))
    sandbox.check(work)


@FUZZ
@given(shipped=st.sampled_from(SHIPPED), cut=st.floats(0, 1), resolved_text=st.booleans())
def test_truncated_shipped_configs(sandbox, capsys, shipped, cut, resolved_text):
    # the file as shipped (its `base:` is then missing) or resolved (every key written out)
    text = dump_config(load_config(ROOT / shipped)) if resolved_text else \
        (ROOT / shipped).read_text()
    work = sandbox.example()
    cli(capsys, "config", write(work, text[:int(len(text) * cut)]))
    sandbox.check(work)


@FUZZ
@given(shipped=st.sampled_from(SHIPPED), data=st.data(), value=values)
def test_a_value_of_another_type_or_size(sandbox, capsys, shipped, data, value):
    raw = resolved(shipped)
    set_path(raw, data.draw(st.sampled_from(leaves(raw))), value)
    work = sandbox.example()
    cli(capsys, "config", write(work, yaml.safe_dump(raw)))
    sandbox.check(work)


@FUZZ
@given(data=st.data(), key=st.text(min_size=1, max_size=10), value=values)
def test_an_unknown_key_anywhere(sandbox, capsys, data, key, value):
    raw = resolved("yaml/quickstart.yaml")
    sections = [()] + [path for path in {leaf[:-1] for leaf in leaves(raw)} if path]
    where = data.draw(st.sampled_from(sorted(sections)))
    target = raw
    for part in where:
        target = target[part]
    if key in target:
        return
    target[key] = value
    work = sandbox.example()
    assert cli(capsys, "config", write(work, yaml.safe_dump(raw))) == 2
    sandbox.check(work)


@FUZZ
@given(data=st.data(), text=st.text(max_size=20))
def test_overrides(sandbox, capsys, data, text):
    keys = [".".join(leaf) for leaf in leaves(resolved("yaml/quickstart.yaml"))]
    override = data.draw(st.one_of(
        st.just(text),  # anything at all
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(keys), st.one_of(
            st.text(max_size=12), st.integers().map(str), st.sampled_from(
                ["", "[", "{a: 1}", "1e400", "-1", "10000000000000000000000", "null", "[1,2]"]))),
        st.builds(lambda k, v: f"{k}={v}", st.text(max_size=12), st.text(max_size=6))))
    work = sandbox.example()
    cli(capsys, "config", str(ROOT / "yaml/quickstart.yaml"), "-o", override)
    sandbox.check(work)


# ------------------------------------------------------------------------- partition files


@pytest.fixture(scope="module")
def partition_file(tmp_path_factory) -> bytes:
    """The bytes of a real partition file of yaml/quickstart.yaml (`raysim partition`)."""
    out = tmp_path_factory.mktemp("partition") / "split.parquet"
    assert main(["partition", str(ROOT / "yaml/quickstart.yaml"), "--out", str(out)]) == 0
    return out.read_bytes()


def partition_cli(capsys, work: Path, data: bytes) -> int:
    path = write(work, data, "split.parquet")
    return cli(capsys, "partition", str(ROOT / "yaml/quickstart.yaml"),
               "-o", "data.partition.kind=file", "-o", f"data.partition.path={path}",
               "--out", str(work / "again.parquet"))


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_a_partition_file(sandbox, capsys, data):
    work = sandbox.example()
    assert partition_cli(capsys, work, data) == 2
    sandbox.check(work)


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                            max_size=3))
def test_truncated_or_altered_partition_files(sandbox, capsys, partition_file, cut, flips):
    data = bytearray(partition_file)
    for where, byte in flips:
        data[int(where * (len(data) - 1))] = byte
    work = sandbox.example()
    partition_cli(capsys, work, bytes(data[:max(1, int(len(data) * cut))] if cut < 1 else data))
    sandbox.check(work)


# -------------------------------------------------------------------- run directories to resume

DAMAGE = ("random bytes", "truncate", "link outside", "link to the earlier run", "dangling link",
          "link loop")


def damage(run_dir: Path, earlier: Path, target: Path, how: str, data: bytes, cut: float,
           rehash: bool) -> None:
    if target.is_dir() and how in ("random bytes", "truncate"):  # a file in its place
        shutil.rmtree(target)
        target.write_bytes(data)
    elif how == "random bytes":
        target.write_bytes(data)
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[:int(target.stat().st_size * cut)])
    else:
        twin = earlier / target.relative_to(run_dir)
        to = {"link outside": Path("/etc/hostname"), "link to the earlier run": twin,
              "dangling link": run_dir / "nowhere", "link loop": target}[how]
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        target.symlink_to(to)
    manifest = target.parent / MANIFEST
    if rehash and target.parent.name.startswith("round-") and target.is_file() \
            and target.name != MANIFEST and manifest.is_file():
        # the manifest agrees with the damage, so the contents themselves are read
        import json

        listed = json.loads(manifest.read_text())
        body = target.read_bytes()
        listed["files"][target.name] = {"bytes": len(body),
                                        "sha256": hashlib.sha256(body).hexdigest()}
        manifest.write_text(json.dumps(listed))


def files_of(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*") if p.is_file() or p.is_dir())


@settings(FUZZ, max_examples=40)
@given(data=st.data(), how=st.sampled_from(DAMAGE), junk=st.binary(max_size=200),
       cut=st.floats(0, 1), rehash=st.booleans(), rounds=st.sampled_from([None, 1, 4]))
def test_damaged_run_directories_resume_or_say_why(sandbox, capsys, data, how, junk, cut,
                                                   rehash, rounds):
    work = sandbox.example()
    run_dir = work / "run"
    shutil.copytree(sandbox.earlier, run_dir, symlinks=True)
    target = data.draw(st.sampled_from(files_of(run_dir)))
    damage(run_dir, sandbox.earlier, target, how, junk, cut, rehash)
    overrides = [] if rounds is None else [f"rounds={rounds}"]
    try:
        run = prepare_resume(run_dir, overrides)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert run.restore is not None and run.restore.round < run.config.rounds
    capsys.readouterr()
    sandbox.check(work)


@pytest.mark.parametrize("name", ["config.yaml", "label_histograms.parquet"])
def test_a_link_to_an_earlier_runs_file_is_replaced_not_written_through(sandbox, name):
    # found by the fuzzing above: resuming wrote the new config through the link
    work = sandbox.example()
    run_dir = work / "run"
    shutil.copytree(sandbox.earlier, run_dir, symlinks=True)
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(sandbox.earlier / name)
    run = prepare_resume(run_dir, ["rounds=4"])
    assert run.config.rounds == 4 and not (run_dir / name).is_symlink()
    assert "rounds: 4" in (run_dir / "config.yaml").read_text()
    sandbox.check(work)
