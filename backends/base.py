"""The Backend contract: say what you support, compile a partition to an Artifact, load it.

A backend never schedules: it gets one partition (an fx GraphModule whose inputs are
activations followed by parameters) and a device description, writes files, and later
turns those files into a callable bound to a device. Options are frozen so the
artifact key is a hash of (partition graph, options, versions): the options every backend
reads (`CompileOptions`) and the backend's own knobs, which it parses into its own frozen
`BackendOptions` subclass (`Backend.options_type`), the way Triton's backends parse theirs
into `CUDAOptions`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import types
import typing
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch.utils import _pytree as pytree

from hetero.backends.substitutes import substituted
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.graph import OpNode
from hetero.partitioner.split import Partition

if typing.TYPE_CHECKING:
    from hetero.backends.warming import Standby, Warming


@dataclass(frozen=True)
class Support:
    """Whether a backend can run an op on a device; falsy with a reason when it cannot."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Support(True)


@dataclass(frozen=True)
class CompileOptions:
    """Everything that changes what a backend emits; part of the artifact key."""

    dtype: str | None = None  # cast the partition to this dtype (None: keep the captured one)
    tune_trials: int = 0  # autotuning budget (MetaSchedule trials, Triton configs); 0 = defaults
    dynamic: bool = False  # compile for the captured dynamic dims instead of the example's sizes
    # Backend-specific knobs as a person writes them, (key, value) pairs. Nothing reads them
    # as pairs: each backend parses the keys it declares into its own frozen options
    # (`Backend.parse_options`); one CompileOptions may serve several backends, so a key
    # another backend declares is not an error there (`BackendRegistry.check_options`
    # rejects keys that no backend declares).
    extra: tuple[tuple[str, Any], ...] = ()

    def with_extra(self, **knobs: Any) -> CompileOptions:
        """A copy with `knobs` set among the backend-specific ones (sorted, one per key)."""
        merged = {**dict(self.extra), **knobs}
        return dataclasses.replace(self, extra=tuple(sorted(merged.items())))


_Options = TypeVar("_Options", bound="BackendOptions")


@dataclass(frozen=True)
class BackendOptions:
    """A backend's own knobs, typed and frozen; a backend subclasses it with its fields
    (each with a default and a comment) and names the subclass in `Backend.options_type`."""

    @classmethod
    def parse(cls: type[_Options], options: CompileOptions, backend: str = "") -> _Options:
        """The fields this class declares, read from `options.extra` and type-checked."""
        hints = typing.get_type_hints(cls)
        given = dict(options.extra)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in given:
                continue
            value = given[f.name]
            allowed = _types_of(hints[f.name])
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(
                    f"option {f.name!r} of backend {backend or cls.__name__!r}: expected "
                    f"{names}, got {value!r}"
                )
            values[f.name] = value
        return cls(**values)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _types_of(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _types_of(a))
    if typing.get_origin(hint) is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    return (hint,)


_Made = TypeVar("_Made")


class SharedExports:
    """A unit's torch.export programs, made once and shared by every backend that compiles
    the unit while it is attached (`CompileUnit.sharing_exports`): the measured choice
    (runtime/choice.py) compiles one partition with up to five backends, and eager,
    cudagraphs, inductor, inductor-cudagraphs and TVM each began with the same export
    (1.1-1.7 s each for ConvNeXt-T or MobileNet on an H200). The files they save from one
    program are shared too (`saved_file`): one write, hard links for the others.

    A program handed out here is shared: a backend must not change it (run_decompositions
    returns a new program; `save_program` saves a copy when it drops the examples).
    Safe across threads; a copy sent to another process (pickled) starts empty."""

    def __init__(self) -> None:
        self._made: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        # saved_file: key -> (the first save, kept in a private directory, its sha256)
        self._files: dict[Hashable, tuple[Path, str]] = {}
        self._dir: Path | None = None

    def get(self, key: Hashable, make: Callable[[], _Made]) -> _Made:
        """The value made for `key`, made now by `make()` if it is the first ask. Held under
        the lock while it is made: a second thread asking for any key waits rather than
        making the same program twice (exports of one unit are not worth running at once)."""
        with self._lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]

    def saved_file(self, key: Hashable, path: Path, write: Callable[[Path], None]) -> None:
        """Put at `path` the file `write(p)` writes for `key`: written once, then linked
        (copied where a link cannot be made) for every later backend. The eager, inductor
        and CUDA-graph candidates save the same program with the same weights: GPT-2 small's
        took 6.3 s each to write on the 2-core box, where a link takes nothing."""
        path = Path(path)
        with self._lock:
            if key not in self._files:
                if self._dir is None:  # beside the artifact's directory: one filesystem
                    try:
                        made = tempfile.mkdtemp(prefix=".shared-", dir=path.parent.parent)
                    except OSError:  # nowhere to keep a first copy: every backend writes
                        write(path)
                        return
                    self._dir = Path(made)
                    weakref.finalize(self, shutil.rmtree, self._dir, True)
                # under its own name: torch.export.save names the archive's folder after it
                first = self._dir / str(len(self._files)) / path.name
                first.parent.mkdir()
                write(first)
                self._files[key] = (first, sha256_file(first))
            first, _ = self._files[key]
        try:
            os.link(first, path)
        except OSError:
            shutil.copyfile(first, path)

    def digest(self, path: Path) -> str | None:
        """The sha256 of `path` when it is one of the files `saved_file` put there (the same
        inode, unchanged since), else None."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        with self._lock:
            for first, digest in self._files.values():
                with contextlib.suppress(OSError):
                    f = os.stat(first)
                    if (f.st_dev, f.st_ino, f.st_size, f.st_mtime_ns) == (
                        st.st_dev,
                        st.st_ino,
                        st.st_size,
                        st.st_mtime_ns,
                    ):
                        return digest
        return None

    def made(self) -> tuple[Any, ...]:
        """Every value made so far, in the order made."""
        with self._lock:
            return tuple(self._made.values())

    def __len__(self) -> int:
        return len(self._made)

    def __reduce__(self) -> tuple[type, tuple]:
        # a lock does not pickle, and programs are per process anyway
        return (SharedExports, ())


@dataclass(frozen=True)
class CompileUnit:
    """One partition as a backend sees it."""

    name: str  # for messages and file names, e.g. "p2"
    module: torch.fx.GraphModule  # inputs: activations (in `inputs` order), then `params`
    inputs: tuple[str, ...]  # activation/user-input names
    params: tuple[str, ...]  # parameter names, following the activations
    outputs: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]  # one per name in `inputs`
    param_values: Mapping[str, torch.Tensor] = field(repr=False, default_factory=dict)
    dynamic_dims: tuple[tuple[int, int, str], ...] = ()  # (input index, dim, symbol)
    # The runtime binds the parameters (a generation's weights and KV cache, one copy per
    # device for both phases): the program takes them as inputs after the activations and
    # the artifact holds no weights, so its key does not depend on their values or names
    # (every decoder layer shares one artifact). Only backends that `holds_state` take it.
    bound_params: bool = False
    # The unit's exports while several backends compile it (`sharing_exports`); None: each
    # export is made afresh. Not settable through __init__ or dataclasses.replace, so that a
    # unit changed by replace (another module, other params) never inherits programs made
    # for the one it came from. Not part of the unit's identity or hash.
    exports: SharedExports | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_partition(
        cls,
        part: Partition,
        env: Mapping[str, Any],
        params: Mapping[str, torch.Tensor],
        dynamic_dims: tuple[tuple[int, int, str], ...] = (),
    ) -> CompileUnit:
        """`env` holds example values for the partition's inputs (from an eager run). Calls
        of library operators hetero runs through its own are rewritten to those
        (backends/substitutes.py)."""
        return cls(
            name=f"p{part.index}",
            module=substituted(_reorder(part)),
            inputs=part.inputs,
            params=part.params,
            outputs=part.outputs,
            example_inputs=tuple(env[a] for a in part.inputs),
            param_values={p: params[p] for p in part.params},
            dynamic_dims=dynamic_dims,
        )

    def sharing_exports(self) -> CompileUnit:
        """This unit with an empty `SharedExports` attached: the backends that compile the
        returned unit export it once per (dtype, flags). Drop the returned unit when they are
        done: its programs hold a copy of the weights. The parameters' digest, when already
        read, carries over (the same tensors)."""
        twin = dataclasses.replace(self)
        object.__setattr__(twin, "exports", SharedExports())
        if "_params_digest" in self.__dict__:
            twin.__dict__["_params_digest"] = self.__dict__["_params_digest"]
        return twin

    def graph_hash(self) -> str:
        """Hash of the partition's graph and of its parameters' contents.

        The graph is read node by node (op, target, args, values named by position), not from
        `module.code`: a pickled copy (sent to a compile worker) is re-traced, which renames
        nodes and drops the source-line comments.
        """
        h = hashlib.sha256(_canonical_graph(self.module.graph).encode())
        for t in pytree.tree_leaves(self.example_inputs):
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            else:
                h.update(repr(t).encode())
        h.update(self._params_digest.encode())
        h.update(repr(self.dynamic_dims).encode())
        h.update(b"bound" if self.bound_params else b"")
        return h.hexdigest()

    @functools.cached_property
    def _params_digest(self) -> str:
        """The parameters' names, shapes and bytes, hashed once per unit: every backend's
        artifact key reads it (the measured choice asks for five keys, the cache again),
        and reading the weights is most of a key's cost (GPT-2's 0.5 GB, a 7B's 14 GB).
        A unit's parameters are not changed in place; a changed unit is a new one
        (dataclasses.replace), with a digest of its own."""
        h = hashlib.sha256()
        for name in self.params:
            t = self.param_values[name].detach()
            if self.bound_params:  # bound at run time: only what the program sees of them
                h.update(f"{tuple(t.shape)}{t.dtype}{t.stride()}".encode())
                continue
            t = t.contiguous().cpu()
            h.update(name.encode())
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        return h.hexdigest()


def _canonical_graph(graph: torch.fx.Graph) -> str:
    index = {n: i for i, n in enumerate(graph.nodes)}

    def arg(a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return f"%{index[a]}"
        if isinstance(a, list | tuple):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in sorted(a.items())) + "}"
        return repr(a)

    return "\n".join(
        f"{n.op} {n.target if n.op != 'placeholder' else ''} {arg(n.args)} {arg(n.kwargs)}"
        for n in graph.nodes
    )


def _reorder(part: Partition) -> torch.fx.GraphModule:
    """The partition's module with activations first, then parameters (it is already so when
    split_module kept the original placeholder order; reorder only when it did not)."""
    inputs, params = part.inputs, part.params
    if tuple(part.arg_names) == tuple(inputs) + tuple(params):
        return part.module
    gm = part.module
    graph = torch.fx.Graph()
    phs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    by_arg = dict(zip(part.arg_names, phs.values(), strict=True))
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for name in (*inputs, *params):
        old = by_arg[name]
        env[old] = graph.placeholder(old.name)
        env[old].meta = dict(old.meta)
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda x: env[x])
    return torch.fx.GraphModule(gm, graph)


@dataclass(frozen=True)
class Artifact:
    """A compiled partition on disk: files plus a manifest that names and hashes them."""

    backend: str
    key: str  # content hash: partition graph, options, target, versions
    path: Path  # directory holding manifest.json and the files
    manifest: Mapping[str, Any]

    @property
    def files(self) -> dict[str, str]:
        """file name -> sha256 of its bytes."""
        return dict(self.manifest.get("files", {}))


@dataclass(frozen=True)
class Manifest:
    backend: str
    key: str
    target: str
    device_kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    versions: Mapping[str, str]
    files: Mapping[str, str]  # name -> sha256
    emulated: bool = False
    notes: str = ""
    # torch.utils._pytree.treespec_dumps of the outputs when an output is itself a tuple
    # (e.g. a partition ending in native_layer_norm); "" when they are plain tensors.
    out_spec: str = ""
    # CompileOptions.dtype the artifact was built for: its runner casts floating inputs to it.
    dtype: str = ""
    # Tensors a call passes after the activations, read from a weights file of the artifact
    # (TVM's CPU libraries take their folded weights so: backends/tvm/params.py).
    params: int = 0
    # Where the compile's time went (seconds by step: "autotune", "codegen", ...) and what it
    # worked through ("kernels", "configs"): hetero/compile_times.py shows them per backend.
    build_seconds: Mapping[str, float] = field(default_factory=dict)
    build_counts: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["versions"] = dict(self.versions)
        d["files"] = dict(self.files)
        d["build_seconds"] = {k: round(v, 3) for k, v in self.build_seconds.items()}
        d["build_counts"] = dict(self.build_counts)
        return json.dumps(d, indent=2, sort_keys=True)


Runner = Callable[..., tuple[torch.Tensor, ...]]


class Backend(abc.ABC):
    """Contract every backend implements. Subclasses set `name` and `device_kinds`, and
    declare what the planner asks about them: `fuses` (a group of ops becomes a few fused
    kernels, so the cost model prices it as one unit) and `options_type` (its own knobs)."""

    name: ClassVar[str]
    device_kinds: ClassVar[tuple[str, ...]]
    # Whether its artifacts can take the partition's parameters and state as runner inputs
    # (CompileOptions extra weights="streamed"): generation binds one copy of the weights
    # and the KV cache to both phases' partitions, and the cache is updated in place.
    holds_state: ClassVar[bool] = False
    fuses: ClassVar[bool] = False
    options_type: ClassVar[type[BackendOptions]] = BackendOptions
    # The device kinds where the measured backend choice (runtime/choice.py) tries it
    # unasked; None: all of `device_kinds`. It still runs where it is planned or pinned.
    choice_kinds: ClassVar[tuple[str, ...] | None] = None
    # The device kinds where the measured choice tries it unasked only as a last resort:
    # after the other candidates, and only when none of them passed its check (then the
    # plan notes it was not measured, and why). It still runs where it is planned or pinned.
    last_resort_kinds: ClassVar[tuple[str, ...]] = ()
    # The backends that run the same program as this one and better, on every device kind
    # this one runs on: where one of them passed its check, the measured choice does not
    # compile or time this one (the plan notes which). It still runs where planned or pinned,
    # and is measured where none of them could run the partition.
    outclassed_by: ClassVar[tuple[str, ...]] = ()
    # Whether a load of an artifact while a runner of it is still alive reuses that runner's
    # program instead of loading (compiling) it again: the measured choice then holds its
    # chosen runner until the stages loaded (runtime/choice.py, `Chooser.held`). Held
    # otherwise, it would only keep one more copy of the weights alive meanwhile.
    shares_loads: ClassVar[bool] = False

    def parse_options(self, options: CompileOptions) -> BackendOptions:
        """This backend's own knobs from `options` (typed; a wrong type is a ConfigError)."""
        return self.options_type.parse(options, self.name)

    def available(self) -> Support:
        """Whether this backend's libraries are importable here."""
        return YES

    def supports(self, node: OpNode, device: DeviceSpec) -> Support:
        """Can this backend run `node` on `device`? Never raises; returns a reason when not."""
        if device.kind not in self.device_kinds:
            return Support(False, f"{self.name} does not target {device.kind} devices")
        return YES

    def prepare_process(self, device: DeviceSpec) -> None:
        """Apply now what loading an artifact for `device` sets in this process (thread pools,
        the variables they read), without loading one. The measured choice
        (runtime/choice.py) calls it for every candidate before it names the conditions its
        times hold for: a setting made by a load during the measuring would otherwise key
        the record differently from the compile that reads it. Nothing by default."""
        return None

    def can_warm(self, device: DeviceSpec) -> bool:
        """Whether `start_warming` starts something for an artifact for `device`. False by
        default: a backend whose compile makes the artifact leaves its load nothing to do."""
        return False

    def start_warming(
        self,
        artifact: Artifact,
        device: DeviceSpec,
        standby: Standby | None = None,
        imports: Sequence[str] = (),
    ) -> Warming | None:
        """Start, in another process, the compile this backend's `load` of `artifact` would
        otherwise do itself (backends/warming.py), so that it runs while this process
        compiles other candidates; None where there is none to start. `standby`: a process
        `stand_by` started earlier, to hand the work to (a fresh one where it cannot).
        `imports`: modules that register library operators the program calls
        (backends/library_ops.py), imported there before the program is read."""
        return None

    def warming_key(self, artifact: Artifact, device: DeviceSpec) -> str | None:
        """What a warming of `artifact` compiles, where two candidates' artifacts may need
        the same compile (then only one warming runs, and both loads wait for it); None:
        each its own."""
        return None

    def load_warmed(
        self, artifact: Artifact, device: DeviceSpec, ready: Callable[[], object]
    ) -> Runner:
        """`load` of an artifact whose warming (`start_warming`) may still run: `ready()`
        waits for it. By default before anything else; a backend whose load does work the
        warming's result is not needed for overrides this to call it as late as it can."""
        ready()
        return self.load(artifact, device)

    def stand_by(self, device: DeviceSpec) -> Standby | None:
        """A warming process for `device` started before any artifact exists, getting ready
        (imports, one-time probes) while the caller plans, for `start_warming` to hand an
        artifact to; None where this backend warms nothing there."""
        return None

    def target(self, device: DeviceSpec, options: CompileOptions) -> str:
        """A string naming what the artifact is compiled for (part of the key)."""
        return f"{self.name}:{device.kind}"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def manifest(
        self,
        unit: CompileUnit,
        device: DeviceSpec,
        options: CompileOptions,
        out_dir: Path,
        files: Sequence[str],
        **fields: Any,
    ) -> Manifest:
        """The manifest of files just written to `out_dir` (hashed here); `fields` override."""
        base: dict[str, Any] = {
            "backend": self.name,
            "key": "",  # the cache fills in the artifact key
            "target": self.target(device, options),
            "device_kind": device.kind,
            "inputs": unit.inputs,
            "outputs": unit.outputs,
            "versions": self.versions(),
            "files": hash_files(out_dir, files, unit.exports),
        }
        return Manifest(**{**base, **fields})

    def artifact_key(self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions) -> str:
        h = hashlib.sha256()
        h.update(unit.graph_hash().encode())
        # the options every backend reads, then this backend's own (parsed: the knobs of
        # other backends in the same CompileOptions do not change this artifact)
        h.update(repr(dataclasses.replace(options, extra=())).encode())
        h.update(repr(self.parse_options(options)).encode())
        h.update(self.target(device, options).encode())
        h.update(json.dumps(self.versions(), sort_keys=True).encode())
        return f"{self.name}-{h.hexdigest()[:32]}"

    @abc.abstractmethod
    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        """Write the artifact's files into `out_dir` and return its manifest (files hashed)."""

    @abc.abstractmethod
    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        """A callable taking the activations (manifest `inputs` order) and returning a tuple."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(
    out_dir: Path, names: Sequence[str], shared: SharedExports | None = None
) -> dict[str, str]:
    """name -> sha256 of each file; a file `shared` saved is not read again."""
    return {n: (shared and shared.digest(out_dir / n)) or sha256_file(out_dir / n) for n in names}
