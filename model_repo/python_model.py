"""Triton Python-backend model for the MIND user tower (copied by `mind export` as `<v>/model.py`).

It runs the TorchScript tower stored beside it (`model.pt`) and reads `meta.json` from the same version
directory, so this file needs no templating: one template serves every version and every K/d/L.

Why validation lives here: Triton core already rejects a wrong dtype or shape against config.pbtxt, but
it cannot know the vocabularies. An out-of-range or negative id would otherwise crash inside
`nn.Embedding` (or silently read garbage on GPU); here it becomes a per-request TritonError naming the
input, while the other requests merged into the same dynamic batch are still answered.

TIMES (optional): the behaviours' Unix seconds [L], 0 = unknown/padding; a request without it counts as all
unknown. It reaches the tower only when meta.json says the tower takes it ("times_input"), and only a tower
trained with behaviour time reads it (as gaps to the window's newest behaviour, so no wall clock).

Which export answered: Triton's response names the numbered version; the optional output META
(TYPE_STRING [2] = model_version, vocab_hash) maps it to the export, and is computed only when a client
asks for it (the 2.51 stub has no response parameters, so an output is the simple in-band way).

Which behaviour fed which interest: the optional output COUPLING (FP32 [L, K]) holds the last routing
iteration's coupling coefficients w_ij (mind.model.MIND.capsules, the paper's Fig. 5) for the candidate
view's user page. It is computed only for the requests that ask for it, by a second pass over their
rows, so the worker's requests (which name their outputs) pay nothing. A tower without `capsules` (not
MIND) leaves COUPLING out of its answer, and the client says so (stream.tower.TritonTower.coupling).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


def _check_range(name: str, arr: np.ndarray, upper: np.ndarray | int | None) -> str | None:
    """Return an error message when ids are negative or >= their vocabulary size, else None."""
    if arr.size == 0:
        return None
    if int(arr.min()) < 0:
        return f"{name} has negative ids (min {int(arr.min())}); ids are >= 0, 0 = padding/none"
    if upper is None:
        return None
    bad = arr >= upper
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return (
            f"{name} id {int(arr[idx])} at index {list(idx)} is out of range "
            f"(vocabulary size {int(np.broadcast_to(upper, arr.shape)[idx])}); map unseen ids to 1 (unknown)"
        )
    return None


class TritonPythonModel:
    """One instance per instance_group entry; each holds its own copy of the TorchScript tower."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.meta = json.loads((version_dir / "meta.json").read_text())
        self.name = f"{args['model_name']}:{args['model_version']}"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        else:
            self.device = torch.device("cpu")
        # config parameter `torch_threads` (set by export): intra-op threads of this instance's stub process
        params = json.loads(args.get("model_config") or "{}").get("parameters", {})
        threads = int(params.get("torch_threads", {}).get("string_value") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        with warnings.catch_warnings():  # torch >= 2.10 warns that TorchScript is deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device).eval()
        m = self.meta
        # a tower that embeds ids >= n_items as the unknown item (cold-start catalogue items, mind.model)
        # accepts them: only negative item ids are refused then
        self.n_items: int | None = None if m.get("items_beyond_vocab") else m.get("n_items")
        self.side_vocab = np.asarray(m["side_vocab"], dtype=np.int64) if m.get("side_vocab") else None
        self.profile_vocab = (
            np.asarray(m["profile_vocab"], dtype=np.int64) if m.get("profile_vocab") else None
        )
        self.has_coupling = hasattr(self.model, "capsules")  # scripted MIND keeps it (forward calls it)
        self.times_input = bool(m.get("times_input"))
        self.meta_row = np.array(
            [str(m["model_version"]).encode(), str(m["vocab_hash"]).encode()], dtype=np.object_
        )

    def _validate(
        self, items: np.ndarray, side: np.ndarray, prof: np.ndarray, times: np.ndarray
    ) -> str | None:
        for err in (
            _check_range("ITEM_IDS", items, self.n_items),
            _check_range("SIDE_IDS", side, self.side_vocab),
            _check_range("PROFILE_IDS", prof, self.profile_vocab),
            _check_range("TIMES", times, None),
        ):
            if err:
                return err
        # Windows are right-padded: a real item after a padding slot means the client packed it wrong.
        if items.shape[1] > 1 and ((items[:, :-1] == 0) & (items[:, 1:] != 0)).any():
            return "ITEM_IDS must be right-padded with 0 (found an item after a padding slot)"
        return None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[int] = []
        batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        want_meta: list[bool] = []
        want_coupling: list[bool] = []
        for i, req in enumerate(requests):
            items = pb_utils.get_input_tensor_by_name(req, "ITEM_IDS").as_numpy()
            side = pb_utils.get_input_tensor_by_name(req, "SIDE_IDS").as_numpy()
            prof = pb_utils.get_input_tensor_by_name(req, "PROFILE_IDS").as_numpy()
            t = pb_utils.get_input_tensor_by_name(req, "TIMES")  # optional: None when not sent
            times = t.as_numpy() if t is not None else np.zeros(items.shape, dtype=np.int64)
            err = self._validate(items, side, prof, times)
            if err:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {err}")
                )
            else:
                good.append(i)
                batches.append((items, side, prof, times))
                want_meta.append("META" in req.requested_output_names())
                want_coupling.append(self.has_coupling and "COUPLING" in req.requested_output_names())
        if good:
            sizes = [b[0].shape[0] for b in batches]
            cat = [
                torch.from_numpy(np.concatenate([b[j] for b in batches])).to(self.device) for j in range(4)
            ]
            try:
                with torch.inference_mode():
                    if self.times_input:
                        interests, active = self.model(cat[0], cat[1], cat[2], cat[3])
                    else:
                        interests, active = self.model(cat[0], cat[1], cat[2])
                interests_np = interests.float().cpu().numpy()
                active_np = active.to(torch.bool).cpu().numpy()
            except Exception as exc:  # noqa: BLE001 - a model failure must become an error response
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{self.name} failed: {exc}")
                    )
                return responses
            start = 0
            for i, n, meta, coupling in zip(good, sizes, want_meta, want_coupling, strict=True):
                outs = [
                    pb_utils.Tensor("INTERESTS", np.ascontiguousarray(interests_np[start : start + n])),
                    pb_utils.Tensor("ACTIVE", np.ascontiguousarray(active_np[start : start + n])),
                ]
                if meta:
                    outs.append(pb_utils.Tensor("META", np.tile(self.meta_row, (n, 1))))
                if coupling:
                    rows = slice(start, start + n)
                    try:
                        w = self._coupling(cat[0][rows], cat[1][rows], cat[3][rows])
                    except Exception as exc:  # noqa: BLE001 - this request fails, the others are answered
                        responses[i] = pb_utils.InferenceResponse(
                            output_tensors=[],
                            error=pb_utils.TritonError(f"{self.name} COUPLING failed: {exc}"),
                        )
                        start += n
                        continue
                    outs.append(pb_utils.Tensor("COUPLING", w))
                responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
                start += n
        return responses

    def _coupling(self, items: torch.Tensor, side: torch.Tensor, times: torch.Tensor) -> np.ndarray:
        """Coupling coefficients w [n, L, K] of these rows (padding rows and inactive interests are 0)."""
        with torch.inference_mode():
            if self.times_input:
                _, _, w = self.model.capsules(items, side, times)
            else:
                _, _, w = self.model.capsules(items, side)
        return np.ascontiguousarray(w.float().cpu().numpy())

    def finalize(self) -> None:
        self.model = None
