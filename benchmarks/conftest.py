"""pytest-benchmark settings shared by the suites in this folder."""


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """``--benchmark-json`` keeps each case's statistics, not every timed round (megabytes per file); pass
    ``--benchmark-save-data`` to keep those too."""
    if config.getoption("benchmark_save_data", False):
        return
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
