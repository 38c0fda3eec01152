"""The prepared GPU check (benchmarks.gpu_check) in its CPU mode: `pytest -m gpu_check` runs just these."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu_check: runs benchmarks.gpu_check in its CPU mode (no CUDA here) and checks its JSON report",
    )
