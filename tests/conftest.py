"""Shared test settings: offline hub, deterministic fp32 on CPU, few threads (CI has 2 cores).

Layout of tests/ (it mirrors the code; every directory is a package, so equal basenames in two directories are
two modules, and helpers import as `tests.support.<module>`):

- `tests/diffit/` the pure model library `diffit/`;
- `tests/<stage>/` one directory per stage of `pipeline/<stage>/` (core, encode, train, evaluate, demo, study,
  report); `tests/<stage>/test_stage.py` is the stage as a whole (its command end to end), the other files are
  named for their subject without the stage's name (`tests/train/test_config.py`, `tests/encode/test_integrity.py`);
- `tests/bench/` the scripts of `bench/`;
- `tests/project/` what no single package owns: the guarantees of docs/architecture.md (test_guarantees.py), the
  import graph of the whole tree, and hostile inputs that cross the stages (exported models, train and evaluate);
- `tests/support/` builders and harnesses imported by tests of several directories (tiny VAEs and models, datasets,
  reference sets, an S3 server, the peak-memory probe); the two that tests run as scripts (`eval_fixtures.py`,
  `hostile_probe.py`) are started by path (`python tests/support/<name>.py ...`) with the repository importable.

Fixtures shared by several directories are here; a fixture used by one directory only is in its conftest.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's cache in a directory of this test session: two pytest processes on one machine sharing
# /tmp/torchinductor_$USER can read each other's half-written kernels ("file too short").
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-tests-")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`): on 2
    shared cores, two spinning OpenMP threads per small op are far slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for each test of a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny models gain nothing from a second thread, and on a busy 2-core machine two threads that wait for each other
    are several times slower than one. Unlike `one_thread`, module-scoped fixtures keep the default threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Session-wide artefacts shared by several test modules (built once per pytest process).


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random-init Inception weights file (plumbing only, ~95 MB)."""
    from tests.support.eval_fixtures import make_random_inception_weights

    return make_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A tiny random AutoencoderKL saved with `save_pretrained`."""
    from tests.support.eval_fixtures import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="session")
def latent_model(tmp_path_factory, tiny_vae):
    """An exported tiny latent DiffiT decoding through `tiny_vae`."""
    from tests.support.eval_fixtures import make_latent_model_dir

    return make_latent_model_dir(tmp_path_factory.mktemp("latent-model") / "model", tiny_vae)


@pytest.fixture(scope="session")
def image_model(tmp_path_factory):
    """An exported tiny image-space DiffiT U-Net (EDM)."""
    from tests.support.eval_fixtures import make_image_model_dir

    return make_image_model_dir(tmp_path_factory.mktemp("image-model") / "model")


@pytest.fixture
def small_disk(tmp_path, request):
    """A real small file system (tmpfs, 256 MiB unless a test marks `@pytest.mark.disk_size("8m")`) at
    tmp_path/disk: the kernel answers ENOSPC when the tests fill it. Mounting needs root: skipped elsewhere."""
    import subprocess

    marker = request.node.get_closest_marker("disk_size")
    size = marker.args[0] if marker else "256m"
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk (needs root / CAP_SYS_ADMIN): {mounted.stderr!r}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)
