"""The seeded fuzzer of tools/fuzz.py: damaged files and odd arguments end in one error line, never in a
traceback or a hang (a longer run by hand: python tools/fuzz.py --cases 5000)."""

import fuzz  # tools/ is on sys.path, see conftest.py


def test_fuzz_cases_end_in_success_or_one_error_line():
    counts, findings = fuzz.run(cases=300, seed=2026, limit=60)  # a first compile is no hang
    assert not findings, "\n".join(findings[:20])
    assert counts["ok"] > 10 and counts["error"] > 100  # the cases reach past the checks as well as into them


def test_fuzz_reports_a_traceback(monkeypatch, tmp_path):
    """The fuzzer can fail: an exception that escapes the CLI is a finding."""
    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr("hybridinfer.commands.common.GGUFFile", broken)
    case = fuzz.Case("test", ["run", str(fuzz.DEFAULT_MODEL), "-n", "1"])
    outcome = fuzz.run_case(case, tmp_path / "case", limit=20)
    assert outcome.kind == "traceback" and "IndexError" in outcome.detail


def test_fuzz_reports_a_hang(monkeypatch, tmp_path):
    def endless(*args, **kwargs):
        while True:
            pass

    monkeypatch.setattr("hybridinfer.commands.common.GGUFFile", endless)
    outcome = fuzz.run_case(fuzz.Case("test", ["run", "-n", "1"]), tmp_path / "case", limit=0.5)
    assert outcome.kind == "hang"
