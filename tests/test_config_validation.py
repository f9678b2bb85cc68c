"""Config checks, as a user meets them: every key's value of the wrong type and every
out-of-range value is refused with the key (and the value) named; unknown keys and
sections are refused; keys that are no longer settings are ignored with one warning;
relative paths resolve against the file's folder; the five folders of [paths] are
distinct, none inside another.

The walks go over the config's records themselves, so a key added without a check
fails here until its check (or its reason for taking any value) is written down.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

import ttsd.config.load as config_load
from ttsd.config import RETIRED, SECTIONS, Config, from_dict, validate
from ttsd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("inbox", "outbox", "done", "failed", "state")


def all_keys() -> dict[str, Any]:
    """Every config key ("section.name") and its type, from the records."""
    return {f"{name}.{f.name}": typing.get_type_hints(cls)[f.name]
            for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def one_key(key: str, value: Any) -> dict[str, dict[str, Any]]:
    """Parsed TOML setting only ``key`` to ``value``."""
    section, name = key.split(".")
    return {section: {name: value}}


def refusal(raw: dict[str, Any]) -> str:
    """The ConfigError text ``from_dict`` gives for ``raw`` read from "c.toml"."""
    with pytest.raises(ConfigError) as info:
        from_dict(raw, where="c.toml")
    return str(info.value)


def ttsd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ttsd.cli ARGS`` in ``cwd``, no $TTSD_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "TTSD_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "ttsd.cli", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=60, env=env)


# ------------------------------------------------------------------ types

WRONG_TYPE: dict[Any, list[Any]] = {
    bool: ["yes", 1, 0],
    int: ["3", 1.5, True],
    float: ["fast", True, [1.0]],
    str: [3, True, ["auto"]],
    Path: [3, True, ""],
    tuple[str, ...]: [3, [1], [""], {"a": "cuda"}],
}
"""Values each type of key refuses (a TOML true is no number; "" is no path)."""


@pytest.mark.parametrize("key", sorted(all_keys()))
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key: str) -> None:
    hint = all_keys()[key]
    assert hint in WRONG_TYPE, f"{key}: a type the config does not read yet: {hint}"
    for value in WRONG_TYPE[hint]:
        message = refusal(one_key(key, value))
        assert message.startswith(f"c.toml: {key}: expected "), message
        assert message.endswith(f"got {value!r}"), message


@pytest.mark.parametrize("key", sorted(k for k, t in all_keys().items() if t is float))
def test_a_number_that_is_not_finite_is_refused(key: str) -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        assert refusal(one_key(key, value)) == f"c.toml: {key}: must be finite, got {value!r}"


# ------------------------------------------------------------------ ranges

OUT_OF_RANGE: dict[str, list[Any]] = {
    "paths.inbox": [""], "paths.outbox": [""], "paths.done": [""], "paths.failed": [""],
    "paths.state": [""],
    "input.settle_s": [-0.5], "input.rescan_s": [0.0, -1.0],
    "input.max_file_bytes": [0, -1], "input.max_lines": [0, -5],
    "input.max_line_chars": [0, -1], "input.max_pending_lines": [0, -1],
    "engine.voice": [""], "engine.voices_dir": [""],
    "engine.device": ["gpu", "", "CPU"],
    "engine.devices": [["cuda:x"], ["cpu", "auto"], ["tpu"]],
    "engine.dtype": ["float64", "half"],
    "engine.speed": [0.05, 10.5, 0.0, -1.0],
    "engine.noise_scale": [10.5], "engine.noise_w": [11.0],
    "engine.sentence_silence_s": [-0.1, 10.5],
    "engine.max_audio_s_per_char": [0.0, -0.5],
    "engine.memory_fraction": [0.0, 1.01, -0.5],
    "engine.phonemizer_processes": [-1, 65],
    "engine.compile": ["yes", "true", ""],
    "engine.fused": ["auto", "yes"],
    "batching.max_batch_size": [-1], "batching.lines_per_batch": [-1],
    "batching.max_wait_ms": [-1], "batching.max_phonemes": [0, -1],
    "batching.prefetch": [0, -1], "batching.writer_threads": [-1],
    "batching.idle_batch": [0.0, 1.01, -0.5],
    "output.subtype": ["PCM_8", "pcm_16", "mp3"],
    "output.format": ["aac", "WAV", ""], "output.bitrate_kbps": [-1, 5, 321],
    "output.sample_rate": [-1, 12345, 96000], "output.loudness_lufs": [-71.0, -4.0, 3.0],
    "output.true_peak_dbtp": [0.5, -21.0], "output.volume": [0.0, -1.0, 17.0],
    "output.join": ["yes", "files", ""], "output.join_format": ["aac", "WAV"],
    "input.markup": ["SSML", "xml", ""], "input.markup_unknown": ["warn", ""],
    "input.paragraph_pause_s": [-0.1, 10.5],
    "output.join_pause_s": [-0.1, 61.0], "output.chapters": ["lines", ""],
    "memory.free_memory_every_s": [-1.0], "memory.idle_s": [-1.0],
    "daemon.log_level": ["verbose", "INFO"], "daemon.heartbeat_s": [0.0, -2.0],
    "daemon.max_attempts": [0, -1], "daemon.stop_timeout_s": [-1.0],
    "daemon.once_blocked_s": [0.0, -1.0],
    "cluster.backend": ["dask", ""], "cluster.address": ["somewhere", ""],
    "cluster.workers": [-1], "cluster.cpus_per_worker": [-1], "cluster.queue_ahead": [-1],
    "cluster.batch_timeout_s": [0.0, -1.0], "cluster.start_timeout_s": [0.0, -1.0],
    "cluster.restart_backoff_s": [-1.0], "cluster.restart_backoff_max_s": [0.5, -1.0],
    "cluster.max_failures": [0, -1], "cluster.failure_window_s": [0.0, -1.0],
}
"""Out-of-range values for each key that has a range (a sign, a bound, a set of words)."""

ANY_VALUE = {
    "paths.voice_cache",     # "" = the per-user cache folder; any other text is a folder
    "input.polling", "engine.warmup", "output.manifest", "output.timestamps",
    "cache.enabled", "cache.link",
    "engine.speaker",        # a name or an id, known only once the voice is loaded
    "engine.seed",           # any integer seeds the noise
    "input.lexicon",         # "" = none; any other text is a file, read (and its errors
                             # named) when the daemon starts
}
"""Keys for which every value of their type means something."""

IN_RANGE: dict[str, list[Any]] = {
    "input.settle_s": [0.0], "engine.speed": [0.1, 10.0], "engine.noise_scale": [10.0, -5.0],
    "engine.noise_w": [10.0, 0.0], "engine.sentence_silence_s": [0.0, 10.0],
    "engine.memory_fraction": [1.0, 0.01], "engine.phonemizer_processes": [0, 64],
    "engine.device": ["auto", "cpu", "cuda", "cuda:1"],
    "engine.devices": ["auto", ["auto"], ["cpu"], ["cuda:0", "cuda:1"], []],
    "batching.max_batch_size": [0], "batching.max_wait_ms": [0], "batching.prefetch": [1],
    "batching.idle_batch": [1.0, 0.01],
    "memory.free_memory_every_s": [0.0], "daemon.max_attempts": [1],
    "daemon.stop_timeout_s": [0.0], "cluster.address": ["auto", "local", "ray://h:10001",
                                                        "h:6379"],
    "cluster.restart_backoff_max_s": [1.0], "cluster.queue_ahead": [0],
    "output.sample_rate": [0, 8000, 48000], "output.bitrate_kbps": [0, 6, 320],
    "output.loudness_lufs": [0.0, -70.0, -5.0], "output.volume": [16.0, 0.01],
    "output.join_format": ["", "m4b"], "output.join_pause_s": [0.0, 60.0],
    "input.markup": ["none", "ssml"], "input.markup_unknown": ["fail", "read"],
    "input.paragraph_pause_s": [0.0, 10.0],
}
"""Values at or near the bounds that are accepted."""


def test_every_key_has_a_range_or_takes_any_value() -> None:
    keys = set(all_keys())
    assert not set(OUT_OF_RANGE) & ANY_VALUE
    assert set(OUT_OF_RANGE) | ANY_VALUE == keys, (
        "keys with neither a range nor a reason to take any value:",
        sorted(keys - set(OUT_OF_RANGE) - ANY_VALUE),
        "listed but not config keys:", sorted((set(OUT_OF_RANGE) | ANY_VALUE) - keys))


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_an_out_of_range_value_is_refused_naming_the_key_and_value(key: str) -> None:
    for value in OUT_OF_RANGE[key]:
        message = refusal(one_key(key, value))
        assert message.startswith(f"c.toml: {key}: "), message
        assert message.endswith(f"got {value!r}"), message


@pytest.mark.parametrize("key", sorted(k for k in OUT_OF_RANGE if all_keys()[k] is not Path))
def test_validate_refuses_what_the_command_line_sets(key: str) -> None:
    """``validate`` alone (as for command-line options over the file) names the key.
    (An empty path is refused as the file is read: ``Path("")`` is the current folder.)"""
    section, name = key.split(".")
    for value in OUT_OF_RANGE[key]:
        if key == "engine.devices":
            value = tuple(value)
        cfg = Config()
        bad = dataclasses.replace(cfg, **{section: dataclasses.replace(
            getattr(cfg, section), **{name: value})})
        with pytest.raises(ConfigError, match=rf"^command line: {key}: "):
            validate(bad, "command line")


@pytest.mark.parametrize("key", sorted(IN_RANGE))
def test_values_at_the_bounds_are_accepted(key: str) -> None:
    section, name = key.split(".")
    for value in IN_RANGE[key]:
        cfg = from_dict(one_key(key, value))
        got = getattr(getattr(cfg, section), name)
        assert got == (tuple(value) if isinstance(value, list) else
                       (value,) if key == "engine.devices" else value), (key, value, got)


def test_the_defaults_pass_their_own_checks() -> None:
    validate(Config())
    assert from_dict({}) == Config()


# ------------------------------------------------------------------ unknown and retired keys


def test_an_unknown_key_is_refused_naming_it() -> None:
    message = refusal({"engine": {"sped": 1.5}})
    assert message.startswith("c.toml: engine.sped: unknown key (known: compile, device, "), \
        message
    assert "speed" in message


def test_an_unknown_section_is_refused_naming_it() -> None:
    assert refusal({"engin": {"speed": 1.5}}) == (
        "c.toml: unknown section [engin] (known: paths, input, engine, batching, output, "
        "cache, memory, daemon, cluster)")
    assert refusal({"engine": 3}) == "c.toml: [engine] must be a table"


def test_a_key_in_the_wrong_section_is_unknown_there() -> None:
    assert refusal({"batching": {"speed": 1.5}}).startswith(
        "c.toml: batching.speed: unknown key")


def test_the_retired_keys_are_no_config_keys() -> None:
    assert not set(RETIRED) & set(all_keys())


@pytest.mark.parametrize("key", sorted(RETIRED))
def test_a_retired_key_is_ignored_with_one_warning(
        key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_load, "_warned", set())
    fixed = RETIRED[key]
    other = (not fixed if isinstance(fixed, bool) else "off" if isinstance(fixed, str)
             else fixed + 1)
    for _ in range(2):   # a reload (SIGHUP) of the same file says nothing new
        assert from_dict(one_key(key, other), where="c.toml") == Config()
    err = capsys.readouterr().err
    assert err.count("ttsd: warning:") == 1, err
    assert f"c.toml: {key} is no longer a setting" in err, err


def test_a_file_with_retired_keys_still_runs_a_command(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[engine]\npack_calls = false\noverlap_halves = "off"\nspeed = 1.5\n'
                      "[daemon]\ngil_switch_ms = 0.0\n", encoding="utf-8")
    out = ttsd(tmp_path, "--config", str(config), "status", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["store"]["path"] == str(tmp_path / "state" / "ttsd.db")
    said = "is no longer a setting (always {} now); it is ignored: remove it from the file"
    auto = '"auto"'
    assert out.stderr.splitlines() == [
        f"ttsd: warning: {config}: engine.pack_calls {said.format('true')}",
        f"ttsd: warning: {config}: engine.overlap_halves {said.format(auto)}",
        f"ttsd: warning: {config}: daemon.gil_switch_ms {said.format('1.0')}"]


# ------------------------------------------------------------------ what the user sees


@pytest.mark.parametrize("table, said", [
    ('[engine]\nspeed = "fast"\n', "engine.speed: expected a number, got 'fast'"),
    ("[batching]\nprefetch = 0\n", "batching.prefetch: must be >= 1, got 0"),
    ("[engine]\nmemory_fraction = 1.5\n", "engine.memory_fraction: must be in (0, 1], got 1.5"),
    ('[output]\nsubtype = "mp3"\n',
     "output.subtype: wav takes PCM_16, PCM_24, PCM_32, FLOAT, ULAW, ALAW, got 'mp3'"),
    ("[input]\nmax_lines = -1\n", "input.max_lines: must be > 0, got -1"),
])
def test_the_command_line_prints_the_refusal(tmp_path: Path, table: str, said: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(table, encoding="utf-8")
    out = ttsd(tmp_path, "--config", str(config), "status", "--json")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr == f"ttsd: {config}: {said}\n"
    assert out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_the_command_line_names_an_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[cache]\nenable = false\n", encoding="utf-8")
    out = ttsd(tmp_path, "--config", str(config), "status", "--json")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr == (f"ttsd: {config}: cache.enable: unknown key "
                          "(known: enabled, link)\n")


# ------------------------------------------------------------------ relative paths


def test_relative_paths_resolve_against_the_files_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)    # the current folder plays no part
    config = site / "etc" / "c.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[paths]\ninbox = "in"\noutbox = "../out"\nstate = "./st/../state"\n'
                      f'failed = "{tmp_path / "abs" / "failed"}"\nvoice_cache = "vc"\n'
                      '[engine]\nvoices_dir = "in/voices"\n', encoding="utf-8")
    cfg = Config.load(config)
    etc = site / "etc"
    assert cfg.source == config
    assert cfg.paths.inbox == etc / "in"
    assert cfg.paths.outbox == site / "out"
    assert cfg.paths.state == etc / "state"
    assert cfg.paths.done == etc / "done"              # a default, relative too
    assert cfg.paths.failed == tmp_path / "abs" / "failed"
    assert cfg.paths.voice_cache == str(etc / "vc")
    assert cfg.paths.voices_cache == etc / "vc"
    assert cfg.engine.voices_dir == etc / "in" / "voices"


def test_an_unset_voice_cache_stays_the_per_user_folder(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[paths]\n", encoding="utf-8")
    assert Config.load(config).paths.voice_cache == ""


def test_a_home_relative_path_is_the_home_folder(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "c.toml"
    config.write_text('[paths]\nstate = "~/ttsd-state"\n', encoding="utf-8")
    assert Config.load(config).paths.state == tmp_path / "home" / "ttsd-state"


def test_the_command_line_uses_the_files_folder(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "c.toml"
    config.parent.mkdir()
    config.write_text('[paths]\nstate = "st"\n', encoding="utf-8")
    out = ttsd(tmp_path, "--config", str(config), "status", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["store"]["path"] == str(tmp_path / "etc" / "st" / "ttsd.db")


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
    config = tmp_path / "c.toml"
    config.write_text(paths_table(state="state"), encoding="utf-8")
    cfg = Config.load(config)
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

