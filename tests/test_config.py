"""Config: which file is used (--config, $TTSD_CONFIG, ./config.toml, defaults) and the
five folders of [paths], which must be distinct and none inside another."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ttsd.config import Config, from_dict, validate
from ttsd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("inbox", "outbox", "done", "failed", "state")


def ttsd(cwd: Path, *args: str, env_config: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    """``python -m ttsd.cli ARGS`` in ``cwd``; ``$TTSD_CONFIG`` set to ``env_config``
    (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k != "TTSD_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    if env_config is not None:
        env["TTSD_CONFIG"] = env_config
    return subprocess.run([sys.executable, "-m", "ttsd.cli", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=60, env=env)


def store_used(cwd: Path, *args: str, env_config: str | None = None) -> Path:
    """The store path ``ttsd status --json`` looked at: it shows which paths.state won."""
    out = ttsd(cwd, *args, "status", "--json", env_config=env_config)
    assert out.returncode == 0, out.stderr
    return Path(json.loads(out.stdout)["store"]["path"])


def config_file(path: Path, state: str) -> Path:
    """A config file at ``path`` whose only setting is ``paths.state``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[paths]\nstate = "{state}"\n', encoding="utf-8")
    return path


# ------------------------------------------------------------------ which file is used


def test_env_config_beats_local_config(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    assert store_used(tmp_path, env_config=str(env)) == tmp_path / "etc" / "env_state" / "ttsd.db"


def test_config_option_beats_env(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    opt = config_file(tmp_path / "opt" / "opt.toml", "opt_state")
    assert store_used(tmp_path, "--config", str(opt), env_config=str(env)) \
        == tmp_path / "opt" / "opt_state" / "ttsd.db"


def test_local_config_when_nothing_is_named(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    assert store_used(tmp_path) == tmp_path / "local_state" / "ttsd.db"


def test_empty_env_config_counts_as_unset(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    assert store_used(tmp_path, env_config="") == tmp_path / "local_state" / "ttsd.db"


def test_no_config_anywhere_uses_the_defaults(tmp_path: Path) -> None:
    assert store_used(tmp_path) == tmp_path / "state" / "ttsd.db"


def test_missing_env_config_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    missing = tmp_path / "etc" / "nowhere.toml"
    out = ttsd(tmp_path, "status", "--json", env_config=str(missing))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"$TTSD_CONFIG names {missing}, which does not exist" in out.stderr
    assert out.stdout == ""


def test_missing_config_option_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    missing = tmp_path / "nowhere.toml"
    out = ttsd(tmp_path, "--config", str(missing), "status", "--json")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"--config names {missing}, which does not exist" in out.stderr
    assert out.stdout == ""


def test_unreadable_named_config_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "a_folder.toml"
    folder.mkdir()
    out = ttsd(tmp_path, "status", "--json", env_config=str(folder))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"$TTSD_CONFIG names {folder}, which cannot be read" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_states_the_lookup_order(tmp_path: Path) -> None:
    out = ttsd(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "$TTSD_CONFIG, else ./config.toml, else the built-in defaults" in text


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config names .*nowhere.toml, which does not"):
        Config.load(tmp_path / "nowhere.toml")


def test_load_without_a_path_reads_env_then_local(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    monkeypatch.setenv("TTSD_CONFIG", str(env))
    assert Config.load().paths.state == tmp_path / "etc" / "env_state"
    monkeypatch.setenv("TTSD_CONFIG", "")
    assert Config.load().paths.state == tmp_path / "local_state"
    monkeypatch.setenv("TTSD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"\$TTSD_CONFIG names .*gone.toml"):
        Config.load()


# ------------------------------------------------------------------ distinct folders


def paths_table(**paths: str) -> str:
    """A [paths] table setting ``paths``."""
    return "[paths]\n" + "".join(f'{k} = "{v}"\n' for k, v in paths.items())


def paths_dict(**paths: str) -> dict[str, dict[str, str]]:
    """Parsed TOML setting ``paths``."""
    return {"paths": paths}


@pytest.mark.parametrize("a, b", list(itertools.combinations(KEYS, 2)))
def test_two_keys_naming_one_folder_are_refused(tmp_path: Path, a: str, b: str) -> None:
    shared = tmp_path / "shared"
    raw = {"paths": {k: str(tmp_path / k) for k in KEYS}}
    raw["paths"][a] = raw["paths"][b] = str(shared)
    with pytest.raises(ConfigError) as info:
        from_dict(raw, where="c.toml")
    assert str(info.value) == (f"c.toml: paths.{a} and paths.{b} are the same folder "
                               f"({shared}): each must be its own folder, none inside another")


@pytest.mark.parametrize("outer, inner", list(itertools.permutations(KEYS, 2)))
def test_a_folder_inside_another_is_refused(tmp_path: Path, outer: str, inner: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(paths_table(**{outer: "top", inner: "top/sub"}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.load(config)
    message = str(info.value)
    assert message.startswith(f"{config}: paths.{inner} ({tmp_path / 'top' / 'sub'}) lies "
                              f"inside paths.{outer} ({tmp_path / 'top'})"), message


def test_done_and_failed_set_to_the_inbox_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(paths_table(done="inbox", failed="inbox"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"paths\.inbox, paths\.done and paths\.failed are "
                                          r"the same folder"):
        Config.load(config)


def test_a_symlinked_alias_is_the_same_folder(tmp_path: Path) -> None:
    real, alias = tmp_path / "real", tmp_path / "alias"
    real.mkdir()
    alias.symlink_to(real)
    rest = {k: str(tmp_path / k) for k in ("inbox", "outbox", "state")}
    with pytest.raises(ConfigError) as info:
        from_dict({"paths": {**rest, "done": str(real), "failed": str(alias)}}, where="c.toml")
    assert str(info.value).startswith(
        f"c.toml: paths.done and paths.failed ({alias}) are the same folder ({real}):"), \
        str(info.value)
    config = tmp_path / "c.toml"
    config.write_text(paths_table(done="real", failed="alias"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"paths\.done and paths\.failed are the same folder "
                                          r"\(.*/real\)"):
        Config.load(config)


def test_a_folder_inside_another_through_a_symlink_is_refused(tmp_path: Path) -> None:
    inbox, link = tmp_path / "inbox", tmp_path / "link"
    inbox.mkdir()
    link.symlink_to(inbox)
    rest = {k: str(tmp_path / k) for k in ("outbox", "done", "failed")}
    with pytest.raises(ConfigError) as info:
        from_dict({"paths": {**rest, "inbox": str(inbox), "state": str(link / "state")}},
                  where="c.toml")
    assert str(info.value).startswith(
        f"c.toml: paths.state ({link / 'state'}, which is {inbox / 'state'}) lies inside "
        f"paths.inbox ({inbox}):"), str(info.value)
    config = tmp_path / "c.toml"
    config.write_text(paths_table(state="link/state"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"paths\.state \(.*/inbox/state\) lies inside "
                                          r"paths\.inbox"):
        Config.load(config)


def test_defaults_are_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TTSD_CONFIG", raising=False)
    assert Config.load().paths.inbox == tmp_path / "inbox"
    (tmp_path / "state").mkdir()
    (tmp_path / "inbox").symlink_to(tmp_path / "state")
    with pytest.raises(ConfigError) as info:
        Config.load()
    assert str(info.value).startswith(f"built-in defaults: paths.inbox and paths.state are "
                                      f"the same folder ({tmp_path / 'state'}):"), str(info.value)


def test_resolved_checks_relative_paths(tmp_path: Path) -> None:
    cfg = from_dict(paths_dict(outbox="out", done="out/done"))
    with pytest.raises(ConfigError, match=r"paths\.done .* lies inside paths\.outbox"):
        cfg.resolved(tmp_path)


def test_validate_checks_absolute_paths(tmp_path: Path) -> None:
    cfg = Config.load(config_file(tmp_path / "c.toml", "state"))
    clash = dataclasses.replace(cfg.paths, failed=cfg.paths.done)
    with pytest.raises(ConfigError, match=r"command line: paths\.done and paths\.failed"):
        validate(dataclasses.replace(cfg, paths=clash), "command line")


def test_distinct_folders_are_accepted(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    elsewhere = tmp_path / "elsewhere" / "failed"
    config.write_text(paths_table(inbox="in", outbox="in2", done="in.done",
                                  failed=str(elsewhere), state="st")
                      + '[engine]\nvoices_dir = "in/voices"\n', encoding="utf-8")
    cfg = Config.load(config)
    assert cfg.paths.inbox == tmp_path / "in"
    assert cfg.paths.failed == elsewhere
    assert cfg.engine.voices_dir == tmp_path / "in" / "voices"


def test_run_refuses_overlapping_folders_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(paths_table(done="inbox", failed="inbox"), encoding="utf-8")
    out = ttsd(tmp_path, "run", "--once")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "paths.done" in out.stderr and "paths.failed" in out.stderr, out.stderr
    assert "same folder" in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_init_writes_the_config_that_ttsd_config_names(tmp_path: Path) -> None:
    """`ttsd init` makes the config a named path is meant to hold: a $TTSD_CONFIG that
    does not exist yet is no error for it (for every other command it is)."""
    target = tmp_path / "etc"
    env = {**os.environ, "TTSD_CONFIG": str(target / "config.toml")}
    out = subprocess.run([sys.executable, "-m", "ttsd.cli", "init", str(target)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert (target / "config.toml").is_file()
    status = subprocess.run([sys.executable, "-m", "ttsd.cli", "status", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert status.returncode == 0, status.stderr
