"""The scan gate decides over ECR's recorded scan answers (tests/aws/scan-*.json) and allow-list.

CRITICAL findings, and HIGH findings that have a fix, stop a release unless an unexpired entry of
the allow-list names them; a scan still running is "not finished"; a failed scan clears nothing.
The helper is run as the scripts run it: a subprocess over saved JSON (exit 0 pass, 3 wait, 4
refused, 1 error). The shell side (waiting, override, release and rollback) is in test_verify.py.
"""

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from conftest import ROOT

RECORDED = ROOT / "tests" / "aws"
HELPER = ROOT / "scripts" / "deploy_state.py"
TODAY = "2026-11-30"
DIGEST = "sha256:b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0a1b2c3d4e5f60718293a4b5c"


def gate(scan: str, allowlist_text: str, tmp_path, today: str = TODAY):
    allowlist = tmp_path / "scan-allowlist"
    allowlist.write_text(allowlist_text, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(HELPER), "scan", str(RECORDED / scan), str(allowlist), today],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_complete_scan_without_blocking_findings_passes(tmp_path):
    result = gate("scan-complete-clean.json", "", tmp_path)
    assert result.returncode == 0, result.stdout
    assert f"scan of {DIGEST}: no blocking findings (LOW=1 MEDIUM=1)" in result.stdout


def test_a_scan_in_progress_is_not_finished(tmp_path):
    result = gate("scan-in-progress.json", "", tmp_path)
    assert result.returncode == 3
    assert f"the ECR scan of {DIGEST} is IN_PROGRESS" in result.stdout


def test_a_failed_scan_clears_nothing(tmp_path):
    result = gate("scan-failed.json", "", tmp_path)
    assert result.returncode == 4
    assert "is FAILED (UnsupportedImageError" in result.stdout
    assert "nothing clears the image" in result.stdout


def test_a_critical_finding_and_a_high_one_of_basic_scanning_block(tmp_path):
    result = gate("scan-critical.json", "", tmp_path)
    assert result.returncode == 4
    assert result.stdout.startswith(f"2 blocking finding(s) in {DIGEST}")
    assert "CVE-2025-40201 (CRITICAL, libssl3t64 3.5.1-1, fix UNKNOWN)" in result.stdout
    # Basic scanning never says whether a fix exists: its HIGH findings count as fixable.
    assert "CVE-2025-40202 (HIGH, libexpat1 2.7.1-2, fix UNKNOWN)" in result.stdout
    assert "CVE-2025-40101" not in result.stdout  # MEDIUM never blocks


def test_only_a_fixable_high_enhanced_finding_blocks(tmp_path):
    result = gate("scan-enhanced.json", "", tmp_path)
    assert result.returncode == 4
    assert result.stdout.startswith("1 blocking finding(s)")
    assert "CVE-2025-40301 (HIGH, libxml2 2.12.7+dfsg-3, fix YES)" in result.stdout
    assert "CVE-2025-40302" not in result.stdout  # HIGH without a fix
    assert "CVE-2025-40303" not in result.stdout  # CRITICAL, but suppressed in Inspector


def test_allow_listed_findings_pass_and_the_reason_is_shown(tmp_path):
    entries = (
        "# accepted findings\n"
        "CVE-2025-40201 2026-12-31 libssl is only used by the Python runtime for outbound TLS\n"
        "CVE-2025-40202  2026-11-30  expat parses no client input here (reviewed by ops)\n"
    )
    result = gate("scan-critical.json", entries, tmp_path)
    assert result.returncode == 0, result.stdout
    assert "no blocking findings (CRITICAL=1 HIGH=1 MEDIUM=1)" in result.stdout
    assert "allow-listed: CVE-2025-40201 (CRITICAL): libssl is only used" in result.stdout
    assert "expat parses no client input here (reviewed by ops) (until 2026-11-30)" in result.stdout


def test_an_expired_allow_list_entry_no_longer_excuses_its_finding(tmp_path):
    entries = "CVE-2025-40201 2026-11-29 expired yesterday\nCVE-2025-40202 2027-01-31 still valid\n"
    result = gate("scan-critical.json", entries, tmp_path)
    assert result.returncode == 4
    assert result.stdout.startswith("1 blocking finding(s)")
    assert "CVE-2025-40201 (CRITICAL" in result.stdout
    assert "[its allow-list entry expired on 2026-11-29]" in result.stdout
    assert "CVE-2025-40202" not in result.stdout


def test_an_allow_list_entry_for_another_finding_excuses_nothing(tmp_path):
    result = gate("scan-enhanced.json", "CVE-2025-99999 2027-01-31 another image\n", tmp_path)
    assert result.returncode == 4
    assert "CVE-2025-40301" in result.stdout


@pytest.mark.parametrize(
    "line",
    [
        "CVE-2025-40201",
        "CVE-2025-40201 2026-12-31",  # no reason
        "CVE-2025-40201 31-12-2026 a reason",
        "CVE-2025-40201 2026-02-30 a reason",  # no such day
        "CVE-2025-40201 someday a reason",
    ],
)
def test_a_malformed_allow_list_entry_stops_with_its_line(tmp_path, line):
    result = gate("scan-complete-clean.json", f"# header\n{line}\n", tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("scan-allowlist:2: expected '<vulnerability id> <YYYY-MM-DD")


def test_the_repository_allow_list_is_well_formed_and_has_no_expired_entry():
    sys.path.insert(0, str(HELPER.parent))
    try:
        import deploy_state  # the helper is a script in scripts/, not an installed module
    finally:
        sys.path.pop(0)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    _, expired = deploy_state.allowlist(ROOT / ".github" / "scan-allowlist", today)
    assert expired == {}, "re-check these findings, then renew or remove their entries"
