"""--device / --precision: the choice of device, batches moved to it, windows gathered on it,
bundles that load on any machine; the CUDA half runs only where PyTorch sees a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from conftest import TINY, assert_clean_error, assert_usage_error
from data.synthetic import generate
from retrieval.bundle import load_bundle, save_bundle, config_dict
from retrieval.data import DataSpec, load_dataset, split_users
from retrieval.device import DeviceError, Runtime, cpu_description, cpu_state, resolve_device, runtime_for, to_device
from retrieval.evaluate import exact_index, held_out_users
from retrieval.recommend import recommend
from retrieval.resident import ResidentWindows, gather_histories
from retrieval.samples import Histories, gather_histories as gather_numpy, make_batch
from retrieval.train import TrainConfig, epoch_order, model_config_for, run_steps, setup, train

def cuda(test):
    """A test that needs a GPU: marked `cuda` (bench/gpu_check.sh selects them) and skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    paths = generate(tmp_path_factory.mktemp("tiny_device"), TINY)
    spec = DataSpec(paths["interactions"], paths["items"], paths["users"])
    ds = load_dataset(spec)
    return ds, split_users(ds, 2026), spec


def test_auto_is_cuda_exactly_when_a_gpu_is_there() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_a_runtime_says_which_cpu_it_ran_on() -> None:
    """Manifests and reports record the processor: a seed's training reproduces on one kind of CPU only."""
    described = runtime_for("cpu").describe()
    assert described["cpu"] and described["cpu"] == cpu_description()["cpu"]
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(described) == {"device", "precision", "compile", "cpu", "cpu_capability"}


def test_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_unknown_device_or_precision_is_an_error() -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="unknown precision 'fp16'"):
        runtime_for("cpu", "fp16")


@no_cuda
def test_cli_cuda_without_a_gpu_is_one_line(invoke, tiny_data, tmp_path) -> None:
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", tmp_path / "b", "--device", "cuda")
    assert_clean_error(result, "--device cuda: no CUDA GPU is available to PyTorch on this machine "
                               "(use --device cpu or auto)")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["evaluate", "query", "train", "experiment"])
def test_cli_unknown_device_or_precision_is_a_usage_error(invoke, bundle_k4, index_k4, tiny_data, tmp_path,
                                                          command) -> None:
    args = {"evaluate": ("--bundle", bundle_k4), "query": ("--bundle", bundle_k4, "--index", index_k4, "--user", "u1"),
            "train": ("--interactions", tiny_data["interactions"], "--out", tmp_path / "b"),
            "experiment": ("--interactions", tiny_data["interactions"], "--out", tmp_path / "r.json")}[command]
    assert_usage_error(invoke(command, *args, "--device", "gpu"), "--device", "'gpu' is not one of 'auto', 'cpu', 'cuda'")
    if command in ("train", "experiment"):
        assert_usage_error(invoke(command, *args, "--precision", "fp16"), "--precision",
                           "'fp16' is not one of 'fp32', 'bf16'")
    assert not list(tmp_path.iterdir())


def test_cli_choices_mirror_the_library() -> None:
    import cli
    from retrieval.device import DEVICES, PRECISIONS

    assert get_args(get_args(cli.Device)[0]) == DEVICES
    assert get_args(get_args(cli.Precision)[0]) == PRECISIONS


def test_to_device_moves_every_tensor_and_leaves_cpu_batches_alone(tiny) -> None:
    ds, split, _ = tiny
    users = split.train_users[:3]
    batch = make_batch(ds, users, np.ones(3, dtype=np.int64), 5, with_target=True)
    assert to_device(batch, torch.device("cpu")) is batch
    meta = to_device(batch, torch.device("meta"))  # a device every build has
    assert meta.history.device.type == "meta" and meta.target.device.type == "meta"
    assert all(t.device.type == "meta" for t in meta.user_features.values())
    assert batch.history.device.type == "cpu"  # the original is untouched


def test_torch_gather_equals_the_numpy_gather(tiny) -> None:
    """The device-side gather gives the numpy gather's histories and masks: short and long
    histories, an empty one (end 0) and the last position of a sequence."""
    ds, _, _ = tiny
    rng = np.random.default_rng(0)
    users = rng.integers(0, ds.n_users, 200)
    ends = np.minimum(rng.integers(0, 25, 200), ds.lengths()[users])
    ends[:3] = [0, ds.lengths()[users[1]], 1]
    for L in (1, 4, 50):
        hist, mask = gather_numpy(ds, users, ends, L)
        th, tm = gather_histories(torch.from_numpy(ds.items), torch.from_numpy(ds.offsets), torch.from_numpy(users),
                                  torch.from_numpy(ends), L)
        assert th.dtype == torch.int64 and tm.dtype == torch.bool
        np.testing.assert_array_equal(th.numpy(), hist)
        np.testing.assert_array_equal(tm.numpy(), mask)
    assert not mask[0].any() and mask[1].sum() == min(50, ends[1])


def test_resident_batches_equal_host_batches(tiny) -> None:
    ds, split, _ = tiny
    st = setup(ds, split, model_config_for(ds, dim=8), TrainConfig(seed=0))
    windows = ResidentWindows(ds, st.users, st.positions, torch.device("cpu"))
    idx = np.random.default_rng(1).permutation(len(st.users))[:64]
    host = make_batch(ds, st.users[idx], st.positions[idx], 7, with_target=True)
    dev = windows.batch(windows.order(idx), 7)
    for a, b in [(host.history, dev.history), (host.mask, dev.mask), (host.target, dev.target)]:
        assert torch.equal(a, b)
    assert host.user_features.keys() == dev.user_features.keys()
    assert all(torch.equal(host.user_features[f], dev.user_features[f]) for f in host.user_features)


def _steps(ds, split, runtime: Runtime, steps: int = 6) -> dict[str, torch.Tensor]:
    config = TrainConfig(seed=4, batch_size=16, negatives=32)
    st = setup(ds, split, model_config_for(ds, dim=8, seed=4), config, runtime)
    order = epoch_order(np.random.default_rng(4), len(st.users), 16, steps)
    loss = run_steps(ds, st, order, 16)
    assert np.isfinite(loss)
    return cpu_state(st.model)


def test_training_on_resident_windows_is_bit_identical(tiny) -> None:
    """The same batches, gathered in torch instead of numpy: the same parameters, bit for bit."""
    ds, split, _ = tiny
    host = _steps(ds, split, Runtime(resident=False))
    resident = _steps(ds, split, Runtime(resident=True))
    assert all(torch.equal(host[k], resident[k]) for k in host)


def test_bf16_autocast_trains_on_cpu(tiny) -> None:
    ds, split, _ = tiny
    fp32, bf16 = _steps(ds, split, Runtime()), _steps(ds, split, Runtime(precision="bf16"))
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())  # weights stay fp32
    moved = [k for k in fp32 if fp32[k].is_floating_point() and not torch.equal(fp32[k], bf16[k])]
    assert moved  # the forward really ran in bf16
    assert all(torch.isfinite(v).all() for v in bf16.values() if v.is_floating_point())


def test_a_dense_gradient_bundle_loads_and_serves_on_cpu(tiny, tmp_path: Path) -> None:
    """What a GPU run writes (sparse=False: dense embedding gradients, one Adam) loads and serves
    on a CPU-only machine; the bundle holds CPU tensors."""
    ds, split, spec = tiny
    cfg = model_config_for(ds, dim=8, sparse=False)
    result = train(ds, split, cfg, TrainConfig(epochs=1, batch_size=32, negatives=16), show_progress=False)
    save_bundle(tmp_path / "b", result.model, ds, split, config_dict(cfg, TrainConfig(), spec))
    b = load_bundle(tmp_path / "b")
    assert b.config["model"]["sparse"] is False and not b.model.item_id.sparse
    users, ends, _ = held_out_users(ds, split, "validation")
    rec = recommend(b.model, b.dataset, exact_index(b.model), Histories.of(ds, users, ends), 10)
    again = recommend(result.model, ds, exact_index(result.model), Histories.of(ds, users, ends), 10)
    np.testing.assert_array_equal(rec.items, again.items)
    assert (rec.items > 0).all()


# ------------------------------------------------------------------ CUDA (skipped without a GPU)


@cuda
def test_cuda_training_uses_dense_gradients_fused_adam_and_resident_windows(tiny) -> None:
    ds, split, _ = tiny
    runtime = runtime_for("cuda")
    st = setup(ds, split, model_config_for(ds, dim=8), TrainConfig(batch_size=16, negatives=32), runtime)
    assert st.model.config.sparse is False and not st.model.item_id.sparse
    assert st.windows is not None and st.windows.items.is_cuda
    assert st.sampler.draw().is_cuda and st.log_q.is_cuda
    assert all(o.defaults.get("fused") for o in st.opts)
    order = epoch_order(np.random.default_rng(0), len(st.users), 16, 4)
    assert np.isfinite(run_steps(ds, st, order, 16))


@cuda
def test_cuda_resident_gather_equals_numpy(tiny) -> None:
    ds, _, _ = tiny
    users = np.arange(ds.n_users)
    ends = ds.lengths() // 2
    hist, mask = gather_numpy(ds, users, ends, 6)
    dev = torch.device("cuda")
    th, tm = gather_histories(torch.from_numpy(ds.items).to(dev), torch.from_numpy(ds.offsets).to(dev),
                              torch.from_numpy(users).to(dev), torch.from_numpy(ends).to(dev), 6)
    np.testing.assert_array_equal(th.cpu().numpy(), hist)
    np.testing.assert_array_equal(tm.cpu().numpy(), mask)


@cuda
@pytest.mark.parametrize("precision, compile", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_a_gpu_trained_bundle_loads_and_serves_on_cpu(tiny, tmp_path: Path, precision: str, compile: bool) -> None:
    ds, split, spec = tiny
    runtime = runtime_for("cuda", precision, compile)
    cfg = model_config_for(ds, dim=8)
    result = train(ds, split, cfg, TrainConfig(epochs=1, batch_size=32, negatives=16), out=tmp_path / "b",
                   data_spec=spec, show_progress=False, runtime=runtime)
    assert result.best_recall > 0
    state = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values())
    b = load_bundle(tmp_path / "b")
    assert b.manifest["trained_on"]["device"].startswith("cuda")
    users, ends, _ = held_out_users(ds, split, "validation")
    hist = Histories.of(ds, users, ends)
    on_cpu = recommend(b.model, b.dataset, exact_index(b.model), hist, 10)
    on_gpu = recommend(result.model, ds, exact_index(result.model), hist, 10)  # the model and search on the GPU
    assert (on_cpu.items > 0).all()
    agree = np.mean([len(set(a) & set(c)) / 10 for a, c in zip(on_cpu.items, on_gpu.items)])
    assert agree > 0.95  # the same model; float rounding of CPU and GPU kernels may swap near-ties


@cuda
def test_cli_train_and_evaluate_on_cuda(invoke, tiny_data, tmp_path) -> None:
    out = tmp_path / "b"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", out, "--epochs", "1",
                    "--dim", "8", "--device", "cuda")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--bundle", out, "--device", "cuda", "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--bundle", out, "--device", "cpu", "--out", tmp_path / "c.json")
    assert result.exit_code == 0, result.output


def test_losses_read_back_every_few_steps_are_the_same_losses(tiny) -> None:
    """A GPU run reads its losses every 16 steps (Runtime.loss_read_every): the same training, the
    same mean loss, and checkpoints at the reads that cross a multiple of --checkpoint-every."""
    from retrieval.checkpoint import Checkpointer, Checkpointing
    from retrieval.distributed import Group

    ds, split, _ = tiny
    config = TrainConfig(seed=4, batch_size=16, negatives=32)
    runs = {}
    for every in (1, 4):
        st = setup(ds, split, model_config_for(ds, dim=8, seed=4), config, Runtime(read_every=every))
        order = epoch_order(np.random.default_rng(4), len(st.users), 16, 10)
        calls: list[tuple[int, float]] = []
        runs[every] = (run_steps(ds, st, order, 16, after_step=lambda s, l: calls.append((s, l))), calls,
                       cpu_state(st.model))
    (loss1, calls1, state1), (loss4, calls4, state4) = runs[1], runs[4]
    assert loss1 == loss4 and all(torch.equal(state1[k], state4[k]) for k in state1)
    assert [s for s, _ in calls1] == list(range(1, 11)) and [s for s, _ in calls4] == [4, 8, 10]
    assert dict(calls1)[8] == dict(calls4)[8]  # the running loss sum at a read is the same
    ckpt = Checkpointer(Checkpointing(Path("unused"), every=3), {}, Group(), torch.device("cpu"))
    assert [s for b, s in [(0, 4), (4, 8), (8, 10)] if ckpt.due(b, s, 10)] == [4, 8]  # crossed 3, crossed 6
    assert [s for s in range(1, 11) if ckpt.due(s - 1, s, 10)] == [3, 6, 9]
