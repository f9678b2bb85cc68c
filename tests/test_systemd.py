"""systemd/ttsd.service and its companions (docs/reliability.md,
unit-hardening).

The unit is read as text (a unit file repeats keys such as DeviceAllow=, which
configparser cannot hold), then checked by systemd's own tools where they exist:
``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` (exposure ≤ 1.5).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ttsd.config import Config

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "ttsd.service"
STATE = Path("/var/lib/ttsd")
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``; an empty assignment resets the list."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):                 # continuation line
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        key, value = key.strip(), value.strip()
        values = current.setdefault(key, [])
        if value:
            values.append(value)
        elif key not in ("CapabilityBoundingSet", "AmbientCapabilities"):
            values.clear()
        else:
            values[:] = [""]                    # "CapabilityBoundingSet=" means: none at all
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"{section}.{key}: expected one value, got {values}"
    return values[0]


def seconds(value: str) -> float:
    """systemd time span: "90", "90s", "1min 30s", "5min"."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit_name in re.findall(r"([\d.]+)\s*([a-z]*)", value):
        total += float(number) * units[unit_name]
    return total


def size_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", value)
    assert m, f"not a byte size: {value}"
    return int(m[1]) * 1024 ** " KMGT".index(m[2] or " ")


def test_parse_unit_keeps_repeated_keys() -> None:
    parsed = parse_unit("[Service]\n# c\nDeviceAllow=/dev/a rw\nDeviceAllow=/dev/b rw\n"
                        "Environment=A=1\nEnvironment=\nEnvironment=B=\\\n 2\n"
                        "CapabilityBoundingSet=\n")
    assert parsed["Service"]["DeviceAllow"] == ["/dev/a rw", "/dev/b rw"]
    assert parsed["Service"]["Environment"] == ["B= 2"]
    assert parsed["Service"]["CapabilityBoundingSet"] == [""]


def test_unit_life_cycle(unit: dict[str, dict[str, list[str]]]) -> None:
    """notify-protocol and unit-hardening: Type=notify from the main process, watchdog, graceful
    stop, restart on failure."""
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) == 60
    assert one(unit, "Restart") == "on-failure"
    assert seconds(one(unit, "RestartSec")) == 5
    # ttsd's statuses for what a person must fix: 2 config, 3 site locked, 4 damaged journal
    assert set(one(unit, "RestartPreventExitStatus").split()) == {"2", "3", "4"}
    assert one(unit, "KillSignal") == "SIGTERM"
    assert seconds(one(unit, "TimeoutStopSec")) == 90
    assert one(unit, "ExecStart").split() == [
        "/opt/ttsd/bin/ttsd", "--config", "/etc/ttsd/config.toml", "run"]
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    assert "PYTHONUNBUFFERED=1" in unit["Service"]["Environment"]


def test_unit_identity_and_files(unit: dict[str, dict[str, list[str]]]) -> None:
    """unit-hardening: dedicated user; ProtectSystem=strict; writable = /var/lib/ttsd;
    PrivateTmp."""
    assert one(unit, "User") == "ttsd"
    assert one(unit, "Group") == "ttsd"
    assert one(unit, "StateDirectory") == "ttsd"
    assert str(STATE) in " ".join(unit["Service"].get("ReadWritePaths", []))
    assert one(unit, "WorkingDirectory") == str(STATE)
    assert one(unit, "UMask") == "0007"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("PrivateNetwork", "yes"), ("IPAddressDeny", "any"),
                       ("RestrictAddressFamilies", "AF_UNIX"), ("DevicePolicy", "closed"),
                       ("SystemCallArchitectures", "native"), ("ProtectProc", "invisible"),
                       ("RestrictNamespaces", "yes"), ("LockPersonality", "yes")]:
        assert one(unit, key) == value, key
    assert one(unit, "CapabilityBoundingSet") == ""
    assert one(unit, "AmbientCapabilities") == ""
    assert size_bytes(one(unit, "MemoryMax")) >= 2 * 1024 ** 3


def test_unit_keeps_the_gpu_reachable(unit: dict[str, dict[str, list[str]]]) -> None:
    """unit-hardening: GPU devices reachable: allowed through the device cgroup, /dev not
    replaced."""
    allowed = {entry.split()[0]: entry.split()[1] for entry in unit["Service"]["DeviceAllow"]}
    for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"):
        assert "rw" in allowed.get(node, ""), node
    # /proc/devices names: major 195 is "nvidia" + "nvidiactl" (driver 580), "nvidia-frontend"
    # on older drivers; "nvidia-uvm" is CUDA's unified memory.
    for group in ("char-nvidia", "char-nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm"):
        assert "rw" in allowed.get(group, ""), group
    assert "char-nvidia*" not in allowed    # would also grant nvswitch/nvlink management
    assert not any("*" in node for node in allowed if node.startswith("/"))  # no globs on paths
    # PrivateDevices=yes mounts a /dev without /dev/nvidia*; ProcSubset=pid hides /proc/driver.
    assert unit["Service"].get("PrivateDevices", ["no"]) == ["no"]
    assert unit["Service"].get("ProcSubset", ["all"]) == ["all"]


def test_unit_system_call_filter(unit: dict[str, dict[str, list[str]]]) -> None:
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"
    denied = set(filters[1].removeprefix("~").split())
    assert filters[1].startswith("~")
    assert {"@privileged", "@resources", "@mount", "@debug", "@raw-io", "@reboot", "@swap",
            "@module", "@clock", "@obsolete", "@cpu-emulation"} <= denied
    # Re-allowed after the deny list: only the two calls torch and numpy make at import.
    assert filters[2:] == ["mbind sched_setaffinity"]


def test_stop_timeout_fits_inside_timeout_stop_sec(unit: dict[str, dict[str, list[str]]]) -> None:
    """sigterm-mid-batch: the batch in flight gets stop_timeout_s; systemd waits longer before
    SIGKILL."""
    cfg = Config.load(SYSTEMD / "config.toml")
    assert cfg.daemon.stop_timeout_s + 10 <= seconds(one(unit, "TimeoutStopSec"))


def test_service_config_keeps_every_folder_under_var_lib_ttsd() -> None:
    """systemd/config.toml loads, and only ever points where the sandbox lets ttsd write."""
    cfg = Config.load(SYSTEMD / "config.toml")
    paths = {name: getattr(cfg.paths, name)
             for name in ("inbox", "outbox", "done", "failed", "state")}
    paths["voices_dir"] = cfg.engine.voices_dir
    for name, path in paths.items():
        assert path.is_absolute(), name
        assert path.is_relative_to(STATE), f"{name} = {path} is outside {STATE}"
    assert len(set(paths.values())) == len(paths), "two settings share a folder"
    assert cfg.paths.state.is_relative_to(STATE)


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit.

    verify also checks that ExecStart's program exists and is executable; /opt/ttsd/bin/ttsd
    exists only on an installed host. So: (1) on the unit as shipped, the missing program must
    be its only complaint; (2) a copy whose ExecStart names an existing program (this Python)
    and is otherwise byte-for-byte the same must verify cleanly (exit 0, no output).
    """
    shipped = subprocess.run([ANALYZE, "verify", "--man=no", str(UNIT)],
                             check=False, capture_output=True, text=True, timeout=120)
    complaints = [line for line in (shipped.stdout + shipped.stderr).splitlines() if line.strip()]
    if Path("/opt/ttsd/bin/ttsd").exists():
        assert shipped.returncode == 0, complaints
    else:
        assert complaints, "verify should have noticed the missing /opt/ttsd/bin/ttsd"
        assert all("/opt/ttsd/bin/ttsd" in line and "not executable" in line
                   for line in complaints), complaints

    text = UNIT.read_text(encoding="utf-8")
    copy = tmp_path / "ttsd.service"
    copy.write_text(re.sub(r"(?m)^ExecStart=/opt/ttsd/bin/ttsd ",
                           f"ExecStart={os.path.realpath(sys.executable)} -m ttsd.cli ", text),
                    encoding="utf-8")
    assert copy.read_text() != text
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_analyze
def test_systemd_analyze_security_exposure() -> None:
    """unit-hardening: ``systemd-analyze security --offline=true`` overall exposure ≤ 1.5."""
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
                            check=False, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    m = re.search(r"Overall exposure level for ttsd\.service: (\d+(?:\.\d+)?)", out)
    assert m, out
    exposure = float(m[1])
    assert exposure <= MAX_EXPOSURE, out
    # The big protections must be in place whatever the total (a regression guard).
    for name in ("User=/DynamicUser=", "NoNewPrivileges=", "PrivateNetwork=", "PrivateTmp=",
                 "ProtectSystem=", "ProtectHome=", "PrivateUsers=",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN",
                 "RestrictAddressFamilies=~AF_(INET|INET6)", "SystemCallFilter=~@privileged",
                 "IPAddressDeny="):
        line = next((ln for ln in out.splitlines() if ln[2:].startswith(name + " ")), None)
        assert line is not None and line.startswith("✓"), f"{name}: {line}"


@needs_analyze
def test_security_threshold_is_reached_by_the_hardening(tmp_path: Path) -> None:
    """The bound is not met by accident: a bare unit of the same name scores far worse."""
    bare = tmp_path / "ttsd.service"
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(bare)],
                         check=False, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"Overall exposure level for ttsd\.service: (\d+(?:\.\d+)?)", out)
    assert m and float(m[1]) > 5, out


def test_sysusers_defines_the_ttsd_user() -> None:
    lines = [ln.split() for ln in (SYSTEMD / "ttsd.sysusers").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines and lines[0][:2] == ["u", "ttsd"]
    assert str(STATE) in lines[0]


def _tmpfiles() -> dict[str, list[str]]:
    out = {}
    for ln in (SYSTEMD / "ttsd.tmpfiles").read_text().splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            fields = ln.split()
            if fields[0] == "d":
                out[fields[1]] = fields
    return out


def test_tmpfiles_folders_match_the_service_config() -> None:
    """Every folder of systemd/config.toml is made by tmpfiles, with the intended access."""
    dirs = _tmpfiles()
    cfg = Config.load(SYSTEMD / "config.toml")
    for path in (cfg.paths.inbox, cfg.paths.outbox, cfg.paths.done, cfg.paths.failed,
                 cfg.paths.state, cfg.engine.voices_dir):
        assert str(path) in dirs, path
    assert dirs[str(cfg.paths.inbox)][2:5] == ["2770", "ttsd", "ttsd"]    # group drops files
    assert dirs[str(cfg.paths.state)][2:5] == ["0700", "ttsd", "ttsd"]    # store: ttsd only
    assert dirs[str(STATE)][2] == "0750"


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("systemd-sysusers")
                                              and shutil.which("systemd-tmpfiles")),
                    reason="needs root and systemd-sysusers/systemd-tmpfiles")
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    """Both files run as systemd would run them at boot, against an empty --root."""
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "ttsd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    passwd = (tmp_path / "etc/passwd").read_text()
    entry = next(ln for ln in passwd.splitlines() if ln.startswith("ttsd:"))
    uid, gid, home, shell = (entry.split(":")[i] for i in (2, 3, 5, 6))
    assert home == str(STATE) and shell.endswith("nologin")
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                    str(SYSTEMD / "ttsd.tmpfiles")], check=True, capture_output=True, timeout=60)
    base = tmp_path / "var/lib/ttsd"
    expect = {"": 0o750, "inbox": 0o2770, "outbox": 0o2750, "done": 0o2750, "failed": 0o2750,
              "state": 0o700}
    for name, mode in expect.items():
        st = (base / name).stat()
        assert stat.S_IMODE(st.st_mode) == mode, (name, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (int(uid), int(gid)), name
