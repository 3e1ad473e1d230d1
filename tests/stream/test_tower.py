"""stream.tower against a real tritonserver: splitting, clear errors, and a version flip under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from towerkit import N_ITEMS, K, L, ToyTower, export, random_batch, torch_out
from tritonclient.utils import InferenceServerException
from waiting import until

from stream.embedded.triton import free_port
from stream.tower import TowerError, TritonTower

pytestmark = pytest.mark.slow


def test_batch_larger_than_max_batch_size_is_split(triton):
    tower = TritonTower(triton.server.grpc_url, "toy")
    batch = random_batch(300, seed=1)
    interests, active, served = tower.infer(*batch)
    ref_i, ref_a = torch_out(triton.towers["toy"], batch)
    assert served == "1" and interests.shape[0] == 300
    assert np.abs(interests - ref_i).max() <= 1e-5 and np.array_equal(active, ref_a)
    empty = tower.infer(*(x[:0] for x in batch))
    assert (
        empty[0].shape == (0, *ref_i.shape[1:]) and empty[1].shape == (0, ref_a.shape[1]) and empty[2] == ""
    )


def _raw_infer(url: str, arrays: dict[str, np.ndarray], dtype: str = "INT64") -> None:
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), dtype if name == "ITEM_IDS" else "INT64")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    client.infer("toy", inputs)


def _case(name: str) -> tuple[dict[str, np.ndarray], str]:
    items, side, prof = random_batch(2, seed=0, lengths=[3, L])
    if name == "wrong dtype":
        return {
            "ITEM_IDS": items.astype(np.int32),
            "SIDE_IDS": side,
            "PROFILE_IDS": prof,
        }, "data-type is 'INT32', but model 'toy' expects 'INT64'"
    if name == "wrong shape":
        return {"ITEM_IDS": items[:, :-1], "SIDE_IDS": side, "PROFILE_IDS": prof}, "unexpected shape"
    if name == "missing input":
        return {"ITEM_IDS": items, "SIDE_IDS": side}, "PROFILE_IDS"
    if name == "negative id":
        items[0, 1] = -3
    elif name == "item out of range":
        items[1, 4] = N_ITEMS
    elif name == "side out of range":
        side[1, 2, 1] = 99
    elif name == "left padded":
        items[0] = np.roll(items[0], 2)
    expect = {
        "negative id": "ITEM_IDS has negative ids",
        "item out of range": f"ITEM_IDS id {N_ITEMS} at index \\[1, 4\\] is out of range",
        "side out of range": "SIDE_IDS id 99 .* out of range",
        "left padded": "right-padded",
    }[name]
    return {"ITEM_IDS": items, "SIDE_IDS": side, "PROFILE_IDS": prof}, expect


CASES = [
    "wrong dtype",
    "wrong shape",
    "missing input",
    "negative id",
    "item out of range",
    "side out of range",
    "left padded",
]


@pytest.mark.parametrize("name", CASES)
def test_malformed_requests_get_clear_errors(triton, name):
    arrays, expect = _case(name)
    with pytest.raises(InferenceServerException, match=expect) as err:
        _raw_infer(triton.server.grpc_url, arrays, "INT32" if name == "wrong dtype" else "INT64")
    assert "INVALID_ARG" in str(err.value.status()) or "toy:1: " in str(err.value)
    # the server is still healthy afterwards
    assert TritonTower(triton.server.grpc_url, "toy").infer(*random_batch(1))[2] == "1"


def test_adapter_errors_say_what_to_do(triton):
    tower = TritonTower(triton.server.grpc_url, "toy")
    items, side, prof = random_batch(2)
    with pytest.raises(TowerError, match="integer ids"):
        tower.infer(items.astype(np.float32), side, prof)
    with pytest.raises(TowerError, match="batch sizes differ"):
        tower.infer(items, side[:1], prof)
    with pytest.raises(TowerError, match="negative ids"):
        tower.infer(-items, side, prof)
    with pytest.raises(TowerError, match="mind export"):
        TritonTower(triton.server.grpc_url, "no_such_model").infer(items, side, prof)
    down = TritonTower(f"127.0.0.1:{free_port()}", "toy", timeout_s=2)
    assert not down.ready()
    with pytest.raises(TowerError, match="is Triton running at .* `mind up`"):
        down.infer(items, side, prof)


def test_coupling_is_an_optional_output(triton):
    """COUPLING (routing's w_ij) equals the eager MIND's; a request that names its outputs without it (as
    `infer` does) does not get it; a tower without capsules() (toy) leaves it out."""
    url = triton.server.grpc_url
    batch = random_batch(5, seed=11, lengths=[0, 1, 3, 7, L])
    mind = TritonTower(url, "mind")
    interests, active, w, served = mind.coupling(*batch)
    with torch.inference_mode():
        _, ref_active, ref_w = triton.towers["mind"].capsules(*(torch.from_numpy(x) for x in batch[:2]))
    assert w.shape == (5, L, K) and served == "1"
    np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-5)
    assert np.array_equal(active, ref_active.numpy())
    np.testing.assert_allclose(interests, torch_out(triton.towers["mind"], batch)[0], atol=1e-5)
    # each real behaviour's weights sum to 1 over the active interests; padding rows are 0
    lengths = (batch[0] > 0).sum(1)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(w[r, :n].sum(1), 1.0, atol=1e-5)
        assert not w[r, n:].any()
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("INTERESTS", "ACTIVE")]
    plain = mind.client.infer("mind", _inputs(batch), outputs=wanted)
    assert plain.as_numpy("COUPLING") is None and plain.as_numpy("ACTIVE") is not None
    with pytest.raises(TowerError, match="capsules"):
        TritonTower(url, "toy").coupling(*batch)
    assert TritonTower(url, "toy").infer(*batch)[2] == "1"


def _inputs(batch: tuple[np.ndarray, ...]) -> list[grpcclient.InferInput]:
    out = []
    for name, arr in zip(("ITEM_IDS", "SIDE_IDS", "PROFILE_IDS"), batch, strict=True):
        inp = grpcclient.InferInput(name, list(arr.shape), "INT64")
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def test_new_version_loads_while_requests_flow(triton):
    """Export v2 and load it while a thread keeps sending: no request fails, answers switch 1 -> 2."""
    url = triton.server.grpc_url
    v2_tower = ToyTower(2)
    batch = random_batch(4, seed=5)
    want = {"1": torch_out(triton.towers["flip"], batch)[0], "2": torch_out(v2_tower, batch)[0]}
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        tower = TritonTower(url, "flip")
        while not stop.is_set():
            try:
                interests, _, served = tower.infer(*batch)
                if np.abs(interests - want[served]).max() > 1e-5:
                    failures.append(f"wrong output for version {served}")
                seen.append(served)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                failures.append(repr(exc))
            time.sleep(0.002)  # steady traffic, without starving the loading stub of the 2 cores

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    control = TritonTower(url, "flip")
    until(lambda: len(seen) >= 20, what=lambda: f"20 answers ({len(seen)} so far; failures {failures[:3]})")
    assert export(v2_tower, triton.repo, "flip", "flip-2") == 2
    t0 = time.monotonic()
    assert control.load() == "2"
    print(f"\nreload to v2 took {time.monotonic() - t0:.2f}s; {len(seen)} requests so far")
    n = len(seen)
    until(lambda: len(seen) >= n + 20, what=lambda: f"20 answers after the reload ({len(seen) - n} so far)")
    stop.set()
    thread.join(10)
    assert failures == []
    first_two = seen.index("2")
    assert set(seen[:first_two]) == {"1"} and set(seen[first_two:]) == {"2"}  # one switch, no flapping
    assert control.meta("2").model_version == "flip-2" and control.meta("2").vocab_hash == "vh-flip-2"
    # rollback by pinning a version through a config override, then back to the newest
    assert control.load(1) == "1" and control.infer(*batch)[2] == "1"
    assert control.meta("1").model_version == "flip-1"
    assert control.load() == "2" and control.versions() == ["2"]
    # after an override, a plain load still picks up a newly exported version from the repository
    assert export(ToyTower(3), triton.repo, "flip", "flip-3") == 3
    assert control.load() == "3" and control.meta().model_version == "flip-3"
