"""ONNX Runtime on the CPU as verification runs it: quiet sessions, each run bounded by a
timeout, failures reported in one line that says what to do, and the interface check between
the two models (bnfold.verification.runs and the engine, test-case and locate checks)."""

from __future__ import annotations

import re
import threading

import numpy as np

from bnfold.errors import BnfoldError


class OrtRunner:
    """ONNX Runtime sessions and runs, quiet, CPU, each run bounded by `timeout` seconds."""

    def __init__(self, timeout: float | None):
        import onnxruntime as ort

        self.ort = ort
        self.timeout = timeout
        self.generated = ""  # the non-float inputs bnfold generated, named, once feeds exist
        self._optimised: dict[tuple, tuple] = {}

    def optimised_outputs(self, payload: str | bytes, feeds) -> list[dict[str, np.ndarray]]:
        """Every output of `payload` run by ORT fully optimised on each feed, once per runner:
        the reference's noise floor is asked for again whenever another run (an engine's) is
        judged against it. The session goes as soon as its runs are done."""
        key = (id(payload), tuple(id(feed) for feed in feeds))
        if key not in self._optimised:
            session = self.session(payload, "reference (optimised)", optimised=True)
            outputs = [self.run(session, feed, "reference (optimised)") for feed in feeds]
            self._optimised[key] = (payload, list(feeds), outputs)  # holds what the ids name
        return self._optimised[key][2]

    def session(self, payload: str | bytes, role: str, optimised: bool = False,
                advice: str | None = None):
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 4  # bnfold says what failed, in one line
        try:
            return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types per failure kind
            raise BnfoldError(
                f"ONNX Runtime cannot load the {role} model ({_first_line(exc)}); "
                + (advice or "verification needs ORT to run it: skip it with --no-verify, or "
                   "check the model with onnx.checker")
            ) from None

    def try_run(self, session, feed: dict[str, np.ndarray]) -> str | None:
        """None when `session` runs `feed`, else ORT's message."""
        try:
            self._run(session, feed)
        except _Timeout:
            raise
        except Exception as exc:  # ORT's errors (bad shape, bad type) share no base class
            return _first_line(exc)
        return None

    def run(self, session, feed: dict[str, np.ndarray], role: str,
            names: list[str] | None = None, advice: str | None = None) -> dict[str, np.ndarray]:
        """`session`'s outputs (`names`, else all) on `feed`; a failure is one line ending in
        `advice` (else: how to give other inputs)."""
        try:
            return self._run(session, feed, names)
        except _Timeout:
            raise BnfoldError(
                f"the {role} model ran longer than {self.timeout:g} s on one input set: "
                f"raise --verify-timeout, give smaller --shape dims, or skip with --no-verify"
            ) from None
        except Exception as exc:
            if role == "reference" and self.generated:
                raise BnfoldError(
                    f"ONNX Runtime rejected the values bnfold generated for {self.generated} "
                    f"({_first_line(exc)}): pass real data with --inputs data.npz"
                ) from None
            raise BnfoldError(
                f"ONNX Runtime failed to run the {role} model ({_first_line(exc)}): "
                + (advice or "give the input shapes with --shape NAME=DxD..., real inputs "
                   "with --inputs data.npz, or skip verification with --no-verify")
            ) from None

    def _run(self, session, feed, names: list[str] | None = None):
        names = names or [o.name for o in session.get_outputs()]
        options = self.ort.RunOptions()
        options.log_severity_level = 4
        timer = None
        if self.timeout:
            timer = threading.Timer(self.timeout, _terminate, (options,))
            timer.daemon = True
            timer.start()
        try:
            values = session.run(names, feed, options)
        except Exception:
            if options.terminate:
                raise _Timeout() from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return dict(zip(names, values))


class _Timeout(Exception):
    pass


def _terminate(options) -> None:
    options.terminate = True


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' "
                       r"Status Message: ")
_ORT_SOURCE = re.compile(r"^\S+\.(?:h|cc|cpp):\d+ .*?(?:was false\.|failed\.?)\s*")


def _first_line(exc: BaseException) -> str:
    """ORT's message without its status prefix and C++ source location, on one line."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    text = _ORT_PREFIX.sub("", text)
    node = _ORT_NODE.search(text)
    if node:
        detail = _ORT_SOURCE.sub("", text[node.end():])
        label = f"{node.group(1)} {node.group(2)!r}" if node.group(2) else node.group(1)
        text = f"{label}: {detail}"
    return text[:300]


def interface(session) -> tuple[list[str], list[str]]:
    """A session's input and output names, sorted."""
    return (sorted(i.name for i in session.get_inputs()),
            sorted(o.name for o in session.get_outputs()))


def check_interfaces(ref: tuple[list[str], list[str]],
                     cand: tuple[list[str], list[str]]) -> None:
    """Both models take the same inputs and give the same outputs, by name."""
    if ref != cand:
        raise BnfoldError(
            f"the models have different interfaces (inputs {ref[0]} vs {cand[0]}, outputs "
            f"{ref[1]} vs {cand[1]}): compare a model with its own folded version"
        )
