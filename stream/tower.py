"""Client adapter for the MIND user tower served by Triton (gRPC, numpy in and out).

How the version is reported: Triton's response names the numbered version that answered
(`served_version`, e.g. "2"). The model has an extra output META = (model_version, vocab_hash) that it
fills only when asked; `meta(v)` asks once per numbered version (a one-row request pinned to v) and
caches it, since a numbered version directory is never rewritten. The recall step compares
`meta(v).model_version` with the index's version and refuses to mix.

A batch larger than the server's max_batch_size is split; every chunk after the first is pinned to the
version that answered the first, so one call never mixes versions even while a new version is loading.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class TowerError(RuntimeError):
    """The user tower could not answer; the message says what to do."""


@dataclass(frozen=True)
class TowerMeta:
    """What one numbered Triton version was exported from."""

    served_version: str
    model_version: str
    vocab_hash: str


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options plus a short reconnect backoff. gRPC's backoff grows to
    120 s, so after a Triton outage one worker resumed 17.6 s after the server was back and another after
    1.5 s (`mind chaos`); capped at 2 s, every worker reconnects within about 2 s."""
    ka = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(ka.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class TritonTower:
    """Thread-safe handle on one model in one Triton server; reuses one gRPC channel."""

    def __init__(
        self, url: str = "127.0.0.1:8001", model_name: str = "mind_user_tower", timeout_s: float = 10.0
    ):
        self.url, self.model_name, self.timeout_s = url, model_name, timeout_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=_channel_args())
        self._meta: dict[str, TowerMeta] = {}
        self._config: dict | None = None

    # ---- errors -------------------------------------------------------------------------------
    def _error(self, what: str, exc: InferenceServerException) -> TowerError:
        status = exc.status() or ""
        if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
            hint = f"is Triton running at {self.url}? start it with `mind up`"
        elif "not found" in str(exc.message()) or "unavailable model" in str(exc.message()):
            hint = f"is model '{self.model_name}' exported and loaded? run `mind export`, then load it"
        else:
            hint = "the request was rejected; see the message"
        return TowerError(f"{what} failed on {self.url} ({status}): {exc.message()} -- {hint}")

    # ---- model control ------------------------------------------------------------------------
    def config(self, refresh: bool = False) -> dict:
        """The served model config (JSON form), cached; refreshed after load()."""
        if self._config is None or refresh:
            try:
                self._config = self.client.get_model_config(
                    self.model_name, as_json=True, client_timeout=self.timeout_s
                )["config"]
            except InferenceServerException as exc:
                raise self._error("get_model_config", exc) from None
        return self._config

    @property
    def max_batch_size(self) -> int:
        return int(self.config()["max_batch_size"])

    @property
    def takes_times(self) -> bool:
        """Whether the served config has the optional TIMES input (configs exported before it do not)."""
        return any(t["name"] == "TIMES" for t in self.config()["input"])

    def _inputs(self, named: Sequence[tuple[str, np.ndarray | None]]) -> list[grpcclient.InferInput]:
        """INT64 inputs; TIMES only when given and the served config has it."""
        inputs = []
        for name, arr in named:
            if arr is None or (name == "TIMES" and not self.takes_times):
                continue
            inp = grpcclient.InferInput(name, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs

    def ready(self, version: str = "") -> bool:
        """True when the server is up and the model (or that version) is ready; never raises."""
        try:
            return bool(
                self.client.is_model_ready(self.model_name, str(version), client_timeout=self.timeout_s)
            )
        except InferenceServerException:
            return False

    def versions(self) -> list[str]:
        """Numbered versions the server currently serves."""
        try:
            md = self.client.get_model_metadata(self.model_name, as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self._error("get_model_metadata", exc) from None
        return sorted(md.get("versions", []), key=int)

    def load(self, version: int | str | None = None, timeout_s: float = 300.0) -> str:
        """Load (or reload) the model while requests keep flowing; return the version now served.

        None loads the repository's newest version (config.pbtxt's `latest {num_versions: 1}`). A number
        (rollback, or pinning) reloads with a config override whose version_policy is `specific`; every
        other field is the served config. Triton loads the new version beside the old one and switches
        when it is ready, so in-flight and new requests are all answered.
        """
        try:
            if version is None and "specific" in self._served_policy():
                # Triton skips a plain reload when the files are unchanged, so leaving a pinned (rollback)
                # override needs an override too: the served config with the repository's policy.
                cfg = dict(self.config(refresh=True))
                cfg["version_policy"] = {"latest": {"num_versions": 1}}
                self.client.load_model(self.model_name, config=json.dumps(cfg), client_timeout=timeout_s)
            elif version is None:
                self.client.load_model(self.model_name, client_timeout=timeout_s)
            else:
                if not self.ready():
                    self.client.load_model(self.model_name, client_timeout=timeout_s)
                cfg = dict(self.config(refresh=True))
                cfg["version_policy"] = {"specific": {"versions": [int(version)]}}
                self.client.load_model(self.model_name, config=json.dumps(cfg), client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self._error(f"load_model({self.model_name}, version={version})", exc) from None
        self.config(refresh=True)
        return self.versions()[-1]

    def _served_policy(self) -> dict:
        try:
            return dict(self.config(refresh=True).get("version_policy", {}))
        except TowerError:
            return {}  # not loaded yet

    def unload(self) -> None:
        try:
            self.client.unload_model(self.model_name, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self._error("unload_model", exc) from None

    # ---- inference ----------------------------------------------------------------------------
    def _infer_chunk(
        self,
        items: np.ndarray,
        side: np.ndarray,
        prof: np.ndarray,
        version: str,
        with_meta: bool = False,
        times: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        inputs = self._inputs(
            (("ITEM_IDS", items), ("SIDE_IDS", side), ("PROFILE_IDS", prof), ("TIMES", times))
        )
        names = ("INTERESTS", "ACTIVE", "META") if with_meta else ("INTERESTS", "ACTIVE")
        try:
            res = self.client.infer(
                self.model_name,
                inputs,
                model_version=version,
                outputs=[grpcclient.InferRequestedOutput(n) for n in names],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(f"infer({self.model_name})", exc) from None
        served = res.get_response().model_version
        try:
            interests, active = res.as_numpy("INTERESTS"), res.as_numpy("ACTIVE")
            if with_meta:
                mv, vh = (x.decode() if isinstance(x, bytes) else str(x) for x in res.as_numpy("META")[0])
                self._meta[served] = TowerMeta(served, mv, vh)
        except (ValueError, TypeError, IndexError) as exc:  # e.g. empty tensors from a numpy-2 stub
            raise TowerError(
                f"Triton at {self.url} answered with malformed outputs ({exc}); if the server's Python "
                "environment has numpy>=2, install numpy<2 there (tritonserver 2.51 stub)"
            ) from None
        return interests, active, served

    def infer(
        self,
        item_ids: np.ndarray,
        side_ids: np.ndarray,
        profile_ids: np.ndarray,
        version: str = "",
        times: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """[B,L], [B,L,S], [B,P] int ids -> interests [B,K,d] float32, active [B,K] bool, served version.

        Windows must be right-padded with 0 to the model's max length L (see model_repo/README.md).
        `times` [B,L] (Unix seconds of each behaviour, 0 = unknown) feeds a tower trained with behaviour
        time; it is sent only when the served config has the TIMES input.
        `version` pins a numbered version; "" lets the server's policy choose. An empty batch returns
        empty arrays and served version "" without a call.
        """
        arrs = []
        for name, a in (("item_ids", item_ids), ("side_ids", side_ids), ("profile_ids", profile_ids)):
            a = np.asarray(a)
            if a.dtype.kind not in "iu":
                raise TowerError(f"{name} must be integer ids, got dtype {a.dtype}")
            arrs.append(np.ascontiguousarray(a, dtype=np.int64))
        items, side, prof = arrs
        if times is not None:
            times = np.ascontiguousarray(times, dtype=np.int64)
            if times.shape != items.shape:
                raise TowerError(f"times must have the shape of item_ids {items.shape}, got {times.shape}")
        if not (items.ndim == 2 and side.ndim == 3 and prof.ndim == 2):
            raise TowerError(f"expected [B,L], [B,L,S], [B,P]; got {items.shape}, {side.shape}, {prof.shape}")
        if not items.shape[0] == side.shape[0] == prof.shape[0]:
            raise TowerError(f"batch sizes differ: {items.shape[0]}, {side.shape[0]}, {prof.shape[0]}")
        if items.shape[0] == 0:
            dims = {t["name"]: [int(x) for x in t["dims"]] for t in self.config()["output"]}
            return np.zeros([0, *dims["INTERESTS"]], np.float32), np.zeros([0, *dims["ACTIVE"]], bool), ""
        mbs = self.max_batch_size
        if items.shape[0] <= mbs:
            return self._infer_chunk(items, side, prof, version, times=times)
        for _attempt in range(2):  # a reload may retire the pinned version between chunks: retry once
            outs: list[tuple[np.ndarray, np.ndarray]] = []
            pinned = version
            try:
                for s in range(0, items.shape[0], mbs):
                    i, a, served = self._infer_chunk(
                        items[s : s + mbs],
                        side[s : s + mbs],
                        prof[s : s + mbs],
                        pinned,
                        times=times[s : s + mbs] if times is not None else None,
                    )
                    pinned = pinned or served
                    outs.append((i, a))
            except TowerError:
                if version or _attempt:
                    raise
                continue
            return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]), pinned
        raise AssertionError("unreachable")

    def meta(self, version: str | int | None = None) -> TowerMeta:
        """model_version / vocab_hash of a served version (default: the newest served one)."""
        v = str(version) if version is not None else self.versions()[-1]
        if v not in self._meta:
            cfg = self.config()
            dims = {t["name"]: [int(x) for x in t["dims"]] for t in cfg["input"]}
            zeros = (np.zeros([1, *dims[n]], dtype=np.int64) for n in ("ITEM_IDS", "SIDE_IDS", "PROFILE_IDS"))
            self._infer_chunk(*zeros, version=v, with_meta=True)
        return self._meta[v]

    def coupling(
        self,
        item_ids: np.ndarray,
        side_ids: np.ndarray,
        profile_ids: np.ndarray,
        version: str = "",
        times: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Like `infer`, plus the optional COUPLING output: [B,L], [B,L,S], [B,P] -> interests [B,K,d],
        active [B,K], coupling [B,L,K] (routing's last w_ij: which behaviour fed which interest), served
        version. For inspection (the candidate view's user page), not the hot path: one request, B at most
        max_batch_size. A version exported before COUPLING existed, or a tower that is not MIND:
        TowerError."""
        arrs = [np.ascontiguousarray(a, dtype=np.int64) for a in (item_ids, side_ids, profile_ids)]
        if not 0 < arrs[0].shape[0] <= self.max_batch_size:
            raise TowerError(f"coupling takes 1..{self.max_batch_size} rows, got {arrs[0].shape[0]}")
        t = np.ascontiguousarray(times, dtype=np.int64) if times is not None else None
        inputs = self._inputs(
            (*zip(("ITEM_IDS", "SIDE_IDS", "PROFILE_IDS"), arrs, strict=True), ("TIMES", t))
        )
        try:
            res = self.client.infer(
                self.model_name,
                inputs,
                model_version=version,
                outputs=[grpcclient.InferRequestedOutput(n) for n in ("INTERESTS", "ACTIVE", "COUPLING")],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(f"infer({self.model_name}, COUPLING)", exc) from None
        out = [res.as_numpy(n) for n in ("INTERESTS", "ACTIVE", "COUPLING")]
        if any(o is None for o in out):
            raise TowerError(
                f"{self.model_name} on {self.url} did not return COUPLING: a version exported before it "
                "existed (re-export with `mind export`), or a tower without capsules() (not MIND)"
            )
        return out[0], out[1].astype(bool), out[2], res.get_response().model_version

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonTower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
