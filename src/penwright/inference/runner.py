"""What runs the graph for the engine: one forward pass over its rows, and the key/value cache between passes.

``penwright.inference.engine.Engine`` schedules requests into slots, samples and detokenizes; a runner owns the
onnxruntime session and the cache, and answers two calls: ``prefill(rows)`` (run new prompts, keep
their keys and values) and ``decode(rows)`` (one token for every running row). Two runners exist:

* ``SlotRunner``, for penwright's fused graph (``export.graph=fused``, the default, and its q8/q4/int8
  forms) on the CPU: the graph rewritten by ``slot_graph.slot_graph`` reads and writes one preallocated
  buffer per layer, [slots, heads, context, head_dim], in place at per-row lengths. Rows enter and
  leave without anything being copied; the binding of each batch width is made once and reused.
* ``PaddedRunner``, for every other decoder graph the export writes (``lean``, the traced
  ``transformers`` graph, fp16) and for every graph on CUDA: the standard inputs (``attention_mask``,
  ``past_key_values.*``), the running rows left-padded into one batch. Its keys and values are
  onnxruntime values on the session's device, bound with IOBinding: a decoding step binds the last
  step's outputs as its inputs and never copies them to the host. When rows join or leave, a small
  ONNX graph of its own (gather, slice, pad, concat) rebuilds the batch on that same device. The CPU
  and CUDA paths are this one code with another device name; the tests run it on the CPU.

onnxruntime-gpu lists the CUDA provider even when CUDA cannot run and silently falls back to the
CPU: ``open_session`` says which ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger

GRAPH = "model.onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PREFILL_TOKENS = 8192  # the most padded prompt tokens one prefill run takes (more admitted prompts: more runs)
# what one more prefill run costs, in padded prompt tokens: a run takes about a + b * rows * width, and a / b
# measured ~20 on the GPT-2-124M shape (19.5 ms + 0.95 ms a token) and ~50 on the quickstart (1.2 ms + 0.023 ms)
# on 2 cores; prompts of unlike lengths run apart when that saves more padding than this
RUN_COST = 20


def position_ids_for(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """HF's rule: cumsum(mask) - 1, pads set to 1; the last ``seq`` columns."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -seq:].astype(np.int64)


def _threads() -> set[int]:
    """This process's thread ids (Linux; elsewhere none)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _idle_priority(threads: set[int]) -> None:
    """``threads`` at idle priority (Linux SCHED_IDLE: each runs only on a core no other thread of the machine
    wants, and yields it as soon as one does). Lowering a thread's priority needs no privilege."""
    for tid in threads:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux, or the thread has ended
            pass


def open_session(
    source,
    file: Path,
    threads: int = 0,
    provider: str = "cpu",
    device_id: int = 0,
    spin: bool = True,
    idle_workers: bool = False,
):
    """An onnxruntime session of ``source`` (a path or serialized bytes; ``file`` names it in errors) and the
    provider that really runs it: ``cpu`` or ``cuda``. With ``idle_workers``, the intra-op threads the session
    starts (all but the caller's, which runs its own share of each step) get idle priority: a step spreads over
    the cores that are free, and whatever else wakes (the server's event loop) takes a core from them at once,
    spinning or not."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise PenwrightError(f"provider={provider!r}: use cpu or cuda")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spin:  # idle worker threads sleep instead of spinning: a server shares its cores with I/O
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = [("CUDAExecutionProvider", {"device_id": device_id})] if provider == "cuda" else []
    before = _threads() if idle_workers else set()
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=[*wanted, "CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for a truncated or foreign file
        raise PenwrightError(
            f"{file}: onnxruntime cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
            f"re-export it with `penwright export`"
        ) from None
    if idle_workers:  # the constructor starts the session's thread pool: the threads that appeared meanwhile
        _idle_priority(_threads() - before)
    ran = "cuda" if session.get_providers()[0] == PROVIDERS["cuda"] else "cpu"
    if provider == "cuda" and ran != "cuda":
        get_logger("runner").info(
            "CUDA was asked for but onnxruntime fell back to CPU (no GPU, or CUDA/cuDNN libraries missing): running on CPU"
        )
    return session, ran


def read_beside_graph(path: Path, session) -> tuple[dict, Any]:
    """The model config and tokenizer an export wrote beside its graph, checked against the graph's vocab."""
    from penwright.core.files import load_tokenizer, read_json, short

    fix = "re-export with `penwright export`"
    try:
        config = read_json(path / "config.json", fix)  # a damaged file: one line naming it
        tokenizer = load_tokenizer(path, fix)
    except (OSError, ValueError) as err:
        raise PenwrightError(
            f"{path}: the tokenizer or config.json beside the graph cannot be read "
            f"({short(err, 300)}); re-export with `penwright export`"
        ) from None
    vocab = session.get_outputs()[0].shape[-1]
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise PenwrightError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the graph's vocab is {vocab}: "
            f"they come from different models; re-export with `penwright export`"
        )
    return config, tokenizer


class _Runner:
    """What both runners share: the session, the model's shape, the graph's input and output names."""

    def __init__(self, session, config: dict, slots: int, context: int, eos: int, device: str = "cpu"):
        self.session, self.slots, self.context, self.eos = session, slots, context, eos
        self.device = device
        self.n_head = int(config["n_head"])
        self.head_dim = int(config["n_embd"]) // self.n_head
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else int(config["vocab_size"])
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs()][1:]

    def release(self, row) -> None:
        """A row left (finished, cancelled): its keys and values are no longer read."""

    def batches(self, rows: list, consecutive: bool = False) -> list[list]:
        """Admitted rows (the engine puts prompts of like length side by side) in the prefill runs that cost the
        least: each run ``RUN_COST`` plus its padded tokens, at most PREFILL_TOKENS of them; a row whose prompt is
        scored runs alone; with ``consecutive``, a run holds only consecutive slots."""
        segments: list[list] = []  # rows that may share a run
        for row in rows:
            seg = segments[-1] if segments else None
            alone = row.request.score_prompt or (seg and seg[0].request.score_prompt)
            if seg and not alone and (not consecutive or seg[-1].slot + 1 == row.slot):
                seg.append(row)
            else:
                segments.append([row])
        return [run for seg in segments for run in _cheapest_runs(seg)]


def _cheapest_runs(rows: list) -> list[list]:
    """``rows`` cut into runs of neighbours minimizing the sum of RUN_COST + rows x longest prompt (dynamic
    programming over the cut points)."""
    lengths = [len(r.request.prompt_ids) for r in rows]
    cost, cut = [0] + [float("inf")] * len(rows), [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        longest = 0
        for i in range(j - 1, -1, -1):  # the run rows[i:j]
            longest = max(longest, lengths[i])
            if longest * (j - i) > PREFILL_TOKENS and j - i > 1:
                break
            c = cost[i] + RUN_COST + longest * (j - i)
            if c < cost[j]:
                cost[j], cut[j] = c, i
    runs, j = [], len(rows)
    while j:
        runs.append(rows[cut[j] : j])
        j = cut[j]
    return runs[::-1]


# -- the slot runner: penwright's fused graph, one buffer per layer, rows in place ---------------------------------


def resident_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 buffer of zeros whose memory is in place before it is used. ``np.zeros`` leaves its pages to be
    faulted in one by one as rows first fill them, and on a fresh server that is during the first burst of
    requests: measured on the GPT-2-124M shape with 32 slots (603 MB of cache), the first round's p95 time to
    first token was 530 ms against 108 ms warm. Linux populates anonymous memory in one call (MAP_POPULATE:
    0.24 s for those 603 MB on 2 cores, against 1.2 s touching each page from Python); elsewhere every page is
    touched once here."""
    import mmap

    size = int(np.prod(shape)) * 4
    if size == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(shape, dtype=np.float32)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    buffer = np.frombuffer(memory, dtype=np.float32).reshape(shape)  # zeros: fresh anonymous memory
    if not hasattr(mmap, "MAP_POPULATE"):
        buffer.reshape(-1)[:: mmap.PAGESIZE // 4] = 0.0  # one write a page: each faulted in now
    return buffer


class SlotRunner(_Runner):
    padded = False

    def __init__(self, session, config: dict, slots: int, context: int, eos: int, lone_session=None):
        super().__init__(session, config, slots, context, eos)
        # a run of one row (a prompt, a decoding step) runs here when given: the same graph on more threads
        # (see Engine.load)
        self.lone_session = lone_session
        shape = (slots, self.n_head, context, self.head_dim)
        self.cache = [resident_zeros(shape) for _ in self.past_names]
        # the step's small inputs and its logits: preallocated, so a binding made once per batch width stays valid
        self.ids = np.zeros((slots, 1), dtype=np.int64)
        self.positions = np.zeros((slots, 1), dtype=np.int64)
        self.seqlens = np.zeros(slots, dtype=np.int32)
        self.total = np.zeros(1, dtype=np.int32)
        self.zeros = np.zeros((slots, 1), dtype=np.int64)  # last_index of a decoding step: its one position
        self.logits = np.zeros((slots, 1, self.vocab), dtype=np.float32)
        self._bindings: dict[tuple[bool, int], object] = {}  # (the lone session's, width) -> binding
        # onnxruntime's own session type: its run is called without the Python wrapper, which checks for WebGPU
        # graph capture on every call (~6 us a step), something a CPU session never uses
        self._ort_session = type(session) if hasattr(session, "_sess") else None

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def _bind(self, binding, lo: int, hi: int) -> None:
        for names in (self.past_names, self.present_names):
            for name, buf in zip(names, self.cache):
                view = buf[lo:hi]  # rows lo..hi of a C-contiguous buffer: contiguous, no copy
                if names is self.past_names:
                    binding.bind_input(name, "cpu", 0, np.float32, view.shape, view.ctypes.data)
                else:
                    binding.bind_output(name, "cpu", 0, np.float32, view.shape, view.ctypes.data)

    def _session_for(self, rows: int):
        """The session a run of ``rows`` rows goes to: the lone session for one row, when there is one."""
        return self.lone_session if rows == 1 and self.lone_session is not None else self.session

    def _decode_binding(self, hi: int, lone: bool = False):
        """The binding of a decoding step over slots 0..hi (on the lone session's): made once per width, reused
        every step."""
        binding = self._bindings.get((lone, hi))
        if binding is None:
            binding = (self.lone_session if lone else self.session).io_binding()
            for name, array in (
                ("input_ids", self.ids[:hi]),
                ("position_ids", self.positions[:hi]),
                ("seqlens_k", self.seqlens[:hi]),
                ("total_sequence_length", self.total),
                ("last_index", self.zeros[:hi]),
            ):
                binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            logits = self.logits[:hi]
            binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
            self._bind(binding, 0, hi)
            self._bindings[(lone, hi)] = binding
        return binding

    def batches(self, rows: list, consecutive: bool = True) -> list[list]:
        """Admitted rows in runs of consecutive slots (one prefill each; see ``_Runner.batches``): a slot
        runner's prefill writes into the slots it runs, so its runs are always consecutive."""
        return super().batches(sorted(rows, key=lambda r: r.slot), consecutive=True)

    def prefill(self, rows: list) -> np.ndarray:
        """Run the prompts of rows in consecutive slots as one right-padded batch into those slots. The logits
        [len(rows), picked, vocab]: each prompt's last token (picked 1), or every position of a scored prompt
        (alone in its run). (A pad's keys land past its row's length, where the row's own tokens overwrite
        them and attention never reads.)"""
        n, width = len(rows), max(len(r.request.prompt_ids) for r in rows)
        ids = np.full((n, width), self.eos, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r.request.prompt_ids)] = r.request.prompt_ids
        lengths = np.array([len(r.request.prompt_ids) for r in rows])
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (n, width)).copy()
        seqlens, total = (lengths - 1).astype(np.int32), np.array([width], dtype=np.int32)
        scoring = rows[0].request.score_prompt
        last = np.arange(width, dtype=np.int64)[None] if scoring else (lengths - 1).astype(np.int64)[:, None]
        logits = np.empty((n, last.shape[1], self.vocab), dtype=np.float32)  # every row written by the run
        session = self._session_for(n)
        binding = session.io_binding()
        for name, array in (
            ("input_ids", ids),
            ("position_ids", positions),
            ("seqlens_k", seqlens),
            ("total_sequence_length", total),
            ("last_index", last),
        ):
            binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self._bind(binding, rows[0].slot, rows[-1].slot + 1)
        session.run_with_iobinding(binding)
        for r, length in zip(rows, lengths.tolist()):
            r.length = length
        return logits

    def decode(self, active: list) -> tuple[list, np.ndarray]:
        """One token for each running row (``active``, in slot order) over slots 0..hi; the rows and their
        logits [rows, vocab]."""
        hi = active[-1].slot + 1
        ids, positions, seqlens = self.ids, self.positions, self.seqlens
        if len(active) < hi:  # free slots among the rows: a harmless one-token step each, never read
            seqlens[:hi] = 0
            ids[:hi] = self.eos
            positions[:hi] = 0
        longest = 0
        for r in active:
            ids[r.slot, 0] = r.pending
            positions[r.slot, 0] = r.length
            seqlens[r.slot] = r.length  # tokens in the cache after this step, minus one
            longest = max(longest, r.length)
        self.total[0] = longest + 1
        session = self._session_for(len(active))
        binding = self._decode_binding(hi, lone=session is not self.session)
        if type(session) is self._ort_session:
            session._sess.run_with_iobinding(binding._iobinding, None)
        else:  # a session wrapped by its caller (the tests slow it down or make it fail): through its own method
            session.run_with_iobinding(binding)
        logits = self.logits[:hi, 0] if len(active) == hi else self.logits[[r.slot for r in active], 0]
        return active, logits


# -- the padded runner: any decoder graph, any device ---------------------------------------------------------------


def _cache_graphs(count: int, dtype) -> tuple[bytes, bytes]:
    """Two small graphs over ``count`` cache tensors [rows, heads, length, head_dim]: ``take`` keeps the rows
    ``keep`` from column ``start`` on; ``join`` left-pads two batches to one length and stacks them."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT

    def tensor(name):
        return helper.make_tensor_value_info(name, elem, None)

    def index(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64, None)

    end = helper.make_tensor("end", TensorProto.INT64, [1], [2**62])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
    take = [
        node
        for i in range(count)
        for node in (
            helper.make_node("Gather", [f"x{i}", "keep"], [f"g{i}"], axis=0),
            helper.make_node("Slice", [f"g{i}", "start", "end", "axis"], [f"y{i}"]),
        )
    ]
    join = [
        node
        for i in range(count)
        for node in (
            helper.make_node("Pad", [f"a{i}", "pad_a"], [f"pa{i}"]),
            helper.make_node("Pad", [f"b{i}", "pad_b"], [f"pb{i}"]),
            helper.make_node("Concat", [f"pa{i}", f"pb{i}"], [f"y{i}"], axis=0),
        )
    ]
    out = [tensor(f"y{i}") for i in range(count)]
    graphs = (
        helper.make_graph(
            take, "take", [tensor(f"x{i}") for i in range(count)] + [index("keep"), index("start")], out, [end, axis]
        ),
        helper.make_graph(
            join,
            "join",
            [tensor(f"{ab}{i}") for ab in "ab" for i in range(count)] + [index("pad_a"), index("pad_b")],
            out,
        ),
    )
    return tuple(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
        for g in graphs
    )


class PaddedRunner(_Runner):
    padded = True

    def __init__(self, session, config: dict, slots: int, context: int, eos: int, device: str = "cpu", device_id=0):
        super().__init__(session, config, slots, context, eos, device)
        self.device_id = device_id
        past_type = next(i.type for i in session.get_inputs() if i.name in self.past_names)
        self.dtype = np.float16 if "float16" in past_type else np.float32
        self.order: list = []  # the rows of the batch, in its row order
        self.past: list | None = None  # onnxruntime values [rows, heads, columns, head_dim] on the device
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, columns]: 1 where a row has a token
        self.gone: set = set()
        self._ops: list | None = None

    def cache_bytes(self) -> int:
        """The cache at its largest: every slot at the full context."""
        itemsize = np.dtype(self.dtype).itemsize
        return len(self.past_names) * self.slots * self.n_head * self.context * self.head_dim * itemsize

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list | None):
        """Run the graph once: ``ids`` [batch, seq], ``mask`` [batch, past+seq], ``past`` the onnxruntime values
        of the last step (None: empty). The logits [batch, seq, vocab] (fp32, on the host) and the present keys
        and values, left on the device."""
        binding = self.session.io_binding()
        for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        if past is None:
            empty = np.zeros((len(ids), self.n_head, 0, self.head_dim), dtype=self.dtype)
            for name in self.past_names:
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy().astype(np.float32, copy=False), list(outputs[1:])

    def prefill(self, rows: list) -> np.ndarray:
        """Run the rows' prompts as one left-padded batch, then add their keys and values to the running batch.
        The logits [len(rows), picked, vocab], as ``SlotRunner.prefill``."""
        n, width = len(rows), max(len(r.request.prompt_ids) for r in rows)
        ids = np.full((n, width), self.eos, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, r in enumerate(rows):
            p = r.request.prompt_ids
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
            r.length = len(p)
        logits, present = self.forward(ids, mask, position_ids_for(mask, width), None)
        self._join(rows, present, mask)
        return logits if rows[0].request.score_prompt else logits[:, -1:]

    def release(self, row) -> None:
        self.gone.add(row)

    def decode(self, active: list) -> tuple[list, np.ndarray]:
        """One token for every row of the batch; the rows (in batch order) and their logits [rows, vocab]."""
        self._drop_gone()
        ids = np.array([[r.pending] for r in self.order], dtype=np.int64)
        positions = np.array([[r.length] for r in self.order], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.order), 1), dtype=np.int64)], axis=1)
        logits, self.past = self.forward(ids, mask, positions, self.past)
        self.mask = mask
        return self.order, logits[:, 0]

    # the batch's cache, rebuilt on the device when rows join or leave

    def _run_ops(self, which: int, tensors: list, extra: dict) -> list:
        import onnxruntime as ort

        if self._ops is None:
            providers = ["CUDAExecutionProvider"] if self.device == "cuda" else []
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._ops = [
                ort.InferenceSession(g, options, providers=[*providers, "CPUExecutionProvider"])
                for g in _cache_graphs(len(self.past_names), self.dtype)
            ]
        session = self._ops[which]
        names = [i.name for i in session.get_inputs()]
        binding = session.io_binding()
        for name, value in zip(names, tensors):
            binding.bind_ortvalue_input(name, value)
        for name, array in extra.items():
            binding.bind_cpu_input(name, array)
        for o in session.get_outputs():
            binding.bind_output(o.name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def _drop_gone(self) -> None:
        """Take the rows that left out of the batch, and the columns no remaining row uses."""
        if not self.gone:
            return
        keep = [i for i, r in enumerate(self.order) if r not in self.gone]
        self.gone.clear()
        if not keep:
            self.order, self.past, self.mask = [], None, np.zeros((0, 0), dtype=np.int64)
            return
        if len(keep) == len(self.order):
            return
        mask = self.mask[keep]
        start = int(mask.any(axis=0).argmax())  # the first column a remaining row uses
        assert self.past is not None  # rows are in the batch: so is their cache
        self.past = self._run_ops(
            0, self.past, {"keep": np.array(keep, dtype=np.int64), "start": np.array([start], dtype=np.int64)}
        )
        self.order, self.mask = [self.order[i] for i in keep], mask[:, start:]

    def _join(self, rows: list, present: list, mask: np.ndarray) -> None:
        self._drop_gone()
        if not self.order:
            self.order, self.past, self.mask = list(rows), present, mask
            return
        a, b = self.mask.shape[1], mask.shape[1]
        width = max(a, b)
        pads = [np.array([0, 0, width - w, 0, 0, 0, 0, 0], dtype=np.int64) for w in (a, b)]
        assert self.past is not None  # rows are in the batch: so is their cache
        self.past = self._run_ops(1, [*self.past, *present], {"pad_a": pads[0], "pad_b": pads[1]})
        self.mask = np.concatenate(
            [np.pad(self.mask, ((0, 0), (width - a, 0))), np.pad(mask, ((0, 0), (width - b, 0)))]
        )
        self.order += rows
