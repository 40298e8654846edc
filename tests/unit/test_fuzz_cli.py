"""Property tests through the command line (bounded; benchmarks/fuzz.py runs the long campaign):
any config or data file gives exit 0 with consistent output or exit 2 with our message; never a
traceback, never a hang, never a half-written output."""

import shutil

from hypothesis import HealthCheck, given, settings

from tests.fuzz_cases import config_texts, data_files, prepare_case, scratch, validate_case

SETTINGS = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_any_config_is_valid_or_refused_clearly(tiny_bert, cls_csv):
    seen = set()

    @SETTINGS
    @given(config_texts(tiny_bert, cls_csv))
    def check(case):
        folder = scratch()
        try:
            seen.add(validate_case(*case, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    assert seen == {"valid", "refused"}  # the generator reaches both sides


def test_any_data_file_prepares_or_is_refused_clearly(tiny_bert):
    seen = set()

    @settings(SETTINGS, max_examples=80)
    @given(data_files())
    def check(case):
        folder = scratch()
        try:
            seen.add(prepare_case(*case, tiny_bert, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    assert seen == {"prepared", "refused"}
