"""Trace one forward pass: module calls, grad mode, cut points, saved bytes.

:class:`ForwardTrace` is a context manager active around ``model(**batch)``. It
installs, and removes on exit:

* forward pre/post hooks on every registered module (and global hooks that notice
  modules *not* registered in the model) recording, per call, the grad mode on entry
  (``torch.is_grad_enabled()``, ``torch.is_inference_mode_enabled()``), whether the
  inputs/outputs require grad, and the outputs' ``grad_fn``;
* a :class:`torch.overrides.TorchFunctionMode` that sees every torch op: ops that
  consume a grad-requiring tensor while grad is disabled, cuts (``detach``, ``.data``,
  ``numpy``, ``tolist``, ``item``, ``torch.tensor`` re-wraps) of grad-requiring
  tensors, ``set_grad_enabled`` switches, and the op that raised, each with the first
  frame outside torch;
* ``torch.autograd.graph.saved_tensors_hooks`` counting the bytes autograd keeps for
  backward, attributed to the innermost running module.

Where grad became disabled is located when it happens (frames are live then): from
the point of the transition, the stack is walked outward to the parent module's call,
and each frame's function is scanned statically (:mod:`diagnostics.source`). A walk
that crosses ``torch.utils.checkpoint.CheckpointFunction.forward`` is a reentrant
checkpoint instead, and records whether any of its inputs required grad.
"""

from __future__ import annotations

import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .source import (
    CodeClassifier,
    GradDisableSite,
    SourceLocation,
    frame_location,
    iter_frames,
    scan_callable,
    scan_frame,
)

try:  # the reentrant implementation; present in every torch we support (>= 2.4)
    from torch.utils.checkpoint import CheckpointFunction as _CheckpointFunction

    _CHECKPOINT_FORWARD_CODE: Optional[types.CodeType] = _CheckpointFunction.forward.__code__
except (ImportError, AttributeError):  # pragma: no cover - defensive for future torch
    _CHECKPOINT_FORWARD_CODE = None

_CALL_IMPL_CODES = frozenset(
    fn.__code__
    for fn in (nn.Module._call_impl, getattr(nn.Module, "_wrapped_call_impl", nn.Module._call_impl))
)

_TENSOR = torch.Tensor
#: ops that cut a tensor out of the graph, with the name used in messages.
_CUT_OPS: dict[Any, str] = {
    _TENSOR.detach: ".detach()",
    _TENSOR.detach_: ".detach_()",
    _TENSOR.data.__get__: ".data",  # type: ignore[attr-defined]
    _TENSOR.numpy: ".numpy()",
    _TENSOR.tolist: ".tolist()",
    _TENSOR.item: ".item()",
    torch.tensor: "torch.tensor(...) re-wrap",
    torch.as_tensor: "torch.as_tensor(...) re-wrap",
    _TENSOR.new_tensor: ".new_tensor(...) re-wrap",
}
_SET_GRAD = torch._C._set_grad_enabled
# A fresh method-wrapper on every access: compare with ==, or look it up by hash (as below).
_REQUIRES_GRAD_SET = _TENSOR.requires_grad.__set__  # type: ignore[attr-defined]
_REQUIRES_GRAD_ = _TENSOR.requires_grad_
_CUT, _SWITCH, _REQUIRES = 1, 2, 3
_SPECIAL: dict[Any, int] = {**{f: _CUT for f in _CUT_OPS}, _SET_GRAD: _SWITCH, _REQUIRES_GRAD_: _REQUIRES, _REQUIRES_GRAD_SET: _REQUIRES}
_grad_enabled = torch.is_grad_enabled
#: Inside the module hooks the tensor reads (``requires_grad``, ``grad_fn``, storages) must not
#: come back through :class:`_OpWatch`: each would cost a Python ``__torch_function__`` call.
_NO_TORCH_FUNCTION = torch._C.DisableTorchFunction

_MAX_NODES_PER_CALL = 8
_MAX_SOURCES_PER_EVENT = 8


@dataclass
class CheckpointInfo:
    """A reentrant ``torch.utils.checkpoint`` region seen on the stack.

    Attributes:
        call_site: first frame outside torch that called ``checkpoint`` (user or library).
        user_call_site: first frame in the user's code above it (may equal call_site).
        inputs_require_grad: whether any tensor input of the checkpoint required grad.
    """

    call_site: Optional[SourceLocation]
    user_call_site: Optional[SourceLocation]
    inputs_require_grad: bool


@dataclass
class DisableInfo:
    """Where autograd was turned off, as found from a live stack.

    Attributes:
        site: the ``with`` / decorator / call that disabled grad, when found.
        checkpoint: set instead when the cause is a reentrant checkpoint.
        user_call_site: the first user frame outward of the site (the user's call into
            a library that disabled grad), when the site is not in user code.
        site_kind: file kind of the site (``user``/``library``).
    """

    site: Optional[GradDisableSite] = None
    checkpoint: Optional[CheckpointInfo] = None
    user_call_site: Optional[SourceLocation] = None
    site_kind: Optional[str] = None


@dataclass
class ModuleCall:
    """One call of one module during the traced forward.

    Attributes:
        index: position in :attr:`ForwardTrace.calls`.
        name: qualified name, or ``<unregistered ClassName>``.
        module_id: ``id`` of the module.
        registered: whether the module is registered in the traced model.
        parent: index of the enclosing call, ``None`` for the outermost.
        grad_enabled: ``torch.is_grad_enabled()`` on entry.
        inference_mode: ``torch.is_inference_mode_enabled()`` on entry.
        input_sources: ``grad_fn`` nodes (or leaf tensors) of inputs requiring grad.
        inputs_tracked: any input required grad.
        outputs_tracked: any output required grad (``None`` until the call returns).
        outputs_inference: any output was an inference tensor.
        output_nodes: ``grad_fn`` nodes of the outputs.
        saved_bytes: bytes saved for backward while this was the innermost module.
        disable: set when grad was disabled between the parent's entry and this entry.
        inner_disable: set when this module's own forward disabled grad around its
            outputs (outputs are inference tensors although it was entered normally).
        call_site: where it was called from (user code), filled for anomalies only.
        finished: the call returned (``False`` when the forward raised inside it).
        input_ptrs / output_ptrs: storage pointers, for module-level data flow.
    """

    index: int
    name: str
    module_id: int
    registered: bool
    parent: Optional[int]
    grad_enabled: bool
    inference_mode: bool
    input_sources: list[Any] = field(default_factory=list)
    inputs_tracked: bool = False
    outputs_tracked: Optional[bool] = None
    outputs_inference: bool = False
    output_nodes: list[Any] = field(default_factory=list)
    saved_bytes: int = 0
    disable: Optional[DisableInfo] = None
    inner_disable: Optional[DisableInfo] = None
    call_site: Optional[SourceLocation] = None
    finished: bool = False
    trainable_param_ids: tuple[int, ...] = ()
    input_ptrs: frozenset[int] = frozenset()
    output_ptrs: frozenset[int] = frozenset()
    module_ref: Any = None  # weakref to unregistered modules only (to name them later)


@dataclass
class CutEvent:
    """An op that cut gradient: a cut op, or an op under disabled grad on a tracked input.

    Attributes:
        kind: ``"detached"`` or ``"grad_disabled"``.
        op: display name of the op (``.detach()``, ``linear``...).
        location: first frame outside torch (user code preferred).
        sources: grad_fn nodes / leaf tensors that carried gradient into the op.
        call_index: innermost module call when it happened (``None`` outside modules).
        disable: for ``grad_disabled``: where grad was disabled.
        count: how many times the same (kind, op, location) occurred.
    """

    kind: str
    op: str
    location: Optional[SourceLocation]
    sources: list[Any]
    call_index: Optional[int]
    disable: Optional[DisableInfo] = None
    count: int = 1


@dataclass
class FailedOp:
    """The op that raised during the forward.

    Attributes:
        op: its name.
        location: first frame outside torch (user code preferred).
        inference_inputs: whether any tensor argument was an inference tensor.
        call_index: innermost module call at the time.
        error: ``repr`` of the exception.
    """

    op: str
    location: Optional[SourceLocation]
    inference_inputs: bool
    call_index: Optional[int]
    error: str


def iter_tensors(obj: Any, depth: int = 3, limit: int = 64) -> Iterator[torch.Tensor]:
    """Tensors inside ``obj`` (tensors, lists/tuples, dicts and ``ModelOutput``s)."""
    count = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack and count < limit:
        item, level = stack.pop()
        if isinstance(item, torch.Tensor):
            count += 1
            yield item
        elif level < depth:
            if isinstance(item, dict):
                stack.extend((v, level + 1) for v in reversed(list(item.values())))
            elif isinstance(item, (list, tuple)):
                stack.extend((v, level + 1) for v in reversed(item))


def op_name(func: Any) -> str:
    """A short display name for a torch function."""
    name = _CUT_OPS.get(func) if _hashable(func) else None
    if name:
        return name
    return getattr(func, "__name__", None) or getattr(func, "__qualname__", None) or repr(func)


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # meta/sparse/functional tensors have no plain storage
        return None


class _OpWatch(TorchFunctionMode):
    """The TorchFunctionMode half of :class:`ForwardTrace`."""

    def __init__(self, trace: "ForwardTrace") -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # The hot path of the diagnosis: every torch op of the forward comes through here.
        # One dict lookup sorts out the few ops of interest; the rest pay one grad-mode probe.
        if kwargs is None:
            kwargs = {}
        trace = self.trace
        if not trace.busy:
            try:
                special = _SPECIAL.get(func)
            except TypeError:  # unhashable callables are never special
                special = None
            if special is None:
                if not _grad_enabled():
                    trace._on_nograd(func, args, kwargs)
            elif special == _CUT:
                trace._on_cut(func, args, kwargs)
            elif special == _SWITCH:
                trace._on_set_grad(args)
            else:
                trace._on_requires_grad(args, kwargs)
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not trace.busy:
                trace._on_error(func, args, kwargs, exc)
            raise


def _tracked(args: Any, kwargs: Any) -> list[torch.Tensor]:
    """Tensors requiring grad among an op's arguments (and one level of lists/tuples)."""
    found: list[torch.Tensor] = []
    for group in (args, kwargs.values()):
        for a in group:
            if isinstance(a, _TENSOR):
                if a.requires_grad:
                    found.append(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, _TENSOR) and b.requires_grad:
                        found.append(b)
    return found


class ForwardTrace:
    """Record what autograd sees during one forward of ``model``.

    Args:
        model: the model about to run.
        classifier: decides user vs library code for locations.
        trainable_ids: ``id`` of every trainable parameter of the model.
        report_module_ids: ``id``s of report-level modules (data-flow pointers are
            recorded for those only).
        measure_saved: install ``saved_tensors_hooks`` to count saved bytes.

    Use as a context manager around the forward; afterwards read :attr:`calls`,
    :attr:`events`, :attr:`failed_op`, :attr:`grad_switches` and :attr:`warnings`.
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: CodeClassifier,
        trainable_ids: set[int],
        report_module_ids: Optional[set[int]] = None,
        measure_saved: bool = True,
    ) -> None:
        self.model = model
        self.classifier = classifier
        self.trainable_ids = trainable_ids
        self.report_module_ids = report_module_ids or set()
        self.measure_saved = measure_saved
        self.names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name or "(root)")
        self._own_trainable: dict[int, tuple[int, ...]] = {}
        for module in model.modules():
            own = tuple(id(p) for p in module._parameters.values() if p is not None and p.requires_grad)
            if own:
                self._own_trainable[id(module)] = own
        self.calls: list[ModuleCall] = []
        self.events: list[CutEvent] = []
        self.grad_switches: list[tuple[Optional[SourceLocation], bool, Optional[int]]] = []
        self.failed_op: Optional[FailedOp] = None
        self.warnings: list[warnings.WarningMessage] = []
        self.unregistered_trainable: dict[int, str] = {}
        #: tensors (not parameters) switched to requires_grad=True during the forward.
        self.requires_grad_sites: list[tuple[torch.Tensor, Optional[SourceLocation]]] = []
        self.busy = False
        self._stack: list[int] = []
        self._event_keys: dict[tuple[Any, ...], CutEvent] = {}
        self._scan_cache: dict[tuple[types.CodeType, int], Optional[GradDisableSite]] = {}
        self._handles: list[RemovableHandle] = []
        self._mode: Optional[_OpWatch] = None
        self._saved_ctx: Any = None
        self._warn_ctx: Any = None
        self._saved: list[tuple[int, torch.Tensor]] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ForwardTrace":
        # Two global hooks see every module call, registered or not: cheaper than a pair per
        # module. Global pre-hooks get no kwargs; the post-hook adds the kwargs inputs.
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._global_pre))
        self._handles.append(
            nn.modules.module.register_module_forward_hook(self._global_post, with_kwargs=True, always_call=True)
        )
        if self.measure_saved:
            self._saved_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._saved_ctx.__enter__()
        self._warn_ctx = warnings.catch_warnings(record=True)
        self.warnings = self._warn_ctx.__enter__()
        warnings.simplefilter("always")
        self._mode = _OpWatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc_info)
        finally:
            self._mode = None
            if self._warn_ctx is not None:
                self._warn_ctx.__exit__(*exc_info)
                self._warn_ctx = None
            if self._saved_ctx is not None:
                self._saved_ctx.__exit__(*exc_info)
                self._saved_ctx = None
                self._count_saved()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._stack.clear()

    # ------------------------------------------------------------------ hooks
    def _global_pre(self, module: nn.Module, args: Any) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            with _NO_TORCH_FUNCTION():
                self._enter(module, args, registered=id(module) in self.names)
        finally:
            self.busy = False

    def _global_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            with _NO_TORCH_FUNCTION():
                self._exit(module, output, kwargs)
        finally:
            self.busy = False

    def _enter(self, module: nn.Module, inputs: Any, registered: bool) -> None:
        grad = torch.is_grad_enabled()
        inference = torch.is_inference_mode_enabled()
        parent = self._stack[-1] if self._stack else None
        if registered:
            name = self.names[id(module)]
            own = self._own_trainable.get(id(module), ())
        else:
            name = f"<unregistered {type(module).__name__}>"
            # Unregistered: all its parameters are unknown to the model, so count them all.
            own = tuple(id(p) for p in module.parameters() if p.requires_grad)
            for pid in own:
                self.unregistered_trainable.setdefault(pid, name)
        call = ModuleCall(
            index=len(self.calls),
            name=name,
            module_id=id(module),
            registered=registered,
            parent=parent,
            grad_enabled=grad,
            inference_mode=inference,
            trainable_param_ids=own,
        )
        self._add_inputs(call, inputs, id(module) in self.report_module_ids)
        if not registered:
            try:
                call.module_ref = weakref.ref(module)
            except TypeError:
                call.module_ref = None
        self.calls.append(call)
        self._stack.append(call.index)

        parent_call = self.calls[parent] if parent is not None else None
        disabled_here = parent_call is not None and (
            (parent_call.grad_enabled and not grad) or (inference and not parent_call.inference_mode)
        )
        if not registered or disabled_here or (parent_call is None and not grad):
            frame = sys._getframe(2)  # _enter <- hook <- _call_impl of this module
            call.call_site = self._user_location(frame)
            if disabled_here or (parent_call is None and not grad):
                stop = parent_call.module_id if parent_call is not None else None
                call.disable = self.locate_disable(frame, stop_module_id=stop, skip_module=module)

    def _exit(self, module: nn.Module, output: Any, kwargs: Any = None) -> None:
        index = None
        for pos in range(len(self._stack) - 1, -1, -1):
            if self.calls[self._stack[pos]].module_id == id(module):
                index = self._stack[pos]
                del self._stack[pos:]
                break
        if index is None:
            return
        call = self.calls[index]
        if kwargs:
            self._add_inputs(call, kwargs, id(module) in self.report_module_ids)
        # With always_call=True the hook also runs when forward raised; output is None then.
        call.finished = output is not None
        tracked = False
        inference = False
        nodes = []
        ptrs = []
        track_ptrs = id(module) in self.report_module_ids
        for t in iter_tensors(output):
            if t.requires_grad:
                tracked = True
                if t.grad_fn is not None and len(nodes) < _MAX_NODES_PER_CALL:
                    nodes.append(t.grad_fn)
            if t.is_inference():
                inference = True
            if track_ptrs:
                ptr = _storage_ptr(t)
                if ptr is not None:
                    ptrs.append(ptr)
        call.outputs_tracked = tracked
        call.outputs_inference = inference
        call.output_nodes = nodes
        call.output_ptrs = frozenset(ptrs)
        if inference and not call.inference_mode:
            # The module's own forward switched inference mode on (decorator or with).
            frame = sys._getframe(2)  # _exit <- hook <- _call_impl of this module
            call.call_site = self._user_location(frame)
            site = scan_callable(type(module).forward)
            info = DisableInfo(site=site, user_call_site=call.call_site)
            if site is not None:
                info.site_kind = self.classifier.kind(site.location.file)
            call.inner_disable = info

    def _add_inputs(self, call: ModuleCall, inputs: Any, track_ptrs: bool) -> None:
        """Record the inputs of a call: grad_fn nodes (or leaves) of those requiring grad, storages."""
        sources = call.input_sources
        ptrs = set(call.input_ptrs)
        for t in iter_tensors(inputs):
            if t.requires_grad and len(sources) < _MAX_NODES_PER_CALL:
                sources.append(t.grad_fn if t.grad_fn is not None else t)
                call.inputs_tracked = True
            elif t.requires_grad:
                call.inputs_tracked = True
            if track_ptrs:
                ptr = _storage_ptr(t)
                if ptr is not None:
                    ptrs.add(ptr)
        if track_ptrs:
            call.input_ptrs = frozenset(ptrs)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Called for every tensor autograd saves: only note it; bytes are counted once the
        # forward is over (:meth:`_count_saved`), off the hot path.
        if self._stack:
            self._saved.append((self._stack[-1], tensor))
        return tensor

    def _count_saved(self) -> None:
        """Attribute each saved storage, once, to the innermost call that saved it first."""
        params = set()
        for module in self.model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    ptr = _storage_ptr(tensor) if tensor is not None else None
                    if ptr is not None:
                        params.add(ptr)
        seen: set[int] = set()
        for index, tensor in self._saved:
            ptr = _storage_ptr(tensor)
            if ptr is None or ptr in params or ptr in seen:
                continue
            seen.add(ptr)
            try:
                nbytes = tensor.untyped_storage().nbytes()
            except Exception:
                nbytes = tensor.numel() * tensor.element_size()
            self.calls[index].saved_bytes += nbytes
        self._saved = []

    # ------------------------------------------------------------------ op events
    def _on_cut(self, func: Any, args: Any, kwargs: Any) -> None:
        tracked = _tracked(args, kwargs)
        if not tracked:
            return
        self.busy = True
        try:
            self._record("detached", _CUT_OPS[func], tracked[:16], sys._getframe(2))
        finally:
            self.busy = False

    def _on_nograd(self, func: Any, args: Any, kwargs: Any) -> None:
        # Most ops under no_grad (a frozen encoder) touch nothing that requires grad.
        tracked = _tracked(args, kwargs)
        if not tracked:
            return
        self.busy = True
        try:
            self._record("grad_disabled", op_name(func), tracked[:16], sys._getframe(2))
        finally:
            self.busy = False

    def _on_requires_grad(self, args: Any, kwargs: Any) -> None:
        self.busy = True
        try:
            tensor = args[0] if args else None
            value = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
            if isinstance(tensor, torch.Tensor) and bool(value) and not isinstance(tensor, nn.Parameter):
                self.requires_grad_sites.append((tensor, self._user_location(sys._getframe(2))))
        finally:
            self.busy = False

    def _on_set_grad(self, args: Any) -> None:
        self.busy = True
        try:
            enabled = bool(args[0]) if args else True
            frame = self._first_outside(sys._getframe(2))
            location = frame_location(frame) if frame is not None else None
            self.grad_switches.append((location, enabled, self._stack[-1] if self._stack else None))
        finally:
            self.busy = False

    def _on_error(self, func: Any, args: Any, kwargs: Any, exc: BaseException) -> None:
        if self.failed_op is not None:
            return
        self.busy = True
        try:
            inference = any(t.is_inference() for t in iter_tensors((args, kwargs), depth=2, limit=16))
            self.failed_op = FailedOp(
                op=op_name(func),
                location=self._user_location(sys._getframe(2)),
                inference_inputs=inference,
                call_index=self._stack[-1] if self._stack else None,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self.busy = False

    def _record(self, kind: str, op: str, tracked: list[torch.Tensor], frame: types.FrameType) -> None:
        outside = self._first_outside(frame)
        location = frame_location(outside) if outside is not None else None
        call_index = self._stack[-1] if self._stack else None
        key = (kind, op, location.file if location else None, location.line if location else None, call_index)
        event = self._event_keys.get(key)
        sources = [t.grad_fn if t.grad_fn is not None else t for t in tracked]
        if event is not None:
            event.count += 1
            room = _MAX_SOURCES_PER_EVENT - len(event.sources)
            if room > 0:
                event.sources.extend(sources[:room])
            return
        event = CutEvent(kind, op, location, sources[:_MAX_SOURCES_PER_EVENT], call_index)
        if kind == "grad_disabled":
            stop = self.calls[call_index].module_id if call_index is not None else None
            event.disable = self.locate_disable(frame, stop_module_id=stop, skip_module=None)
        self._event_keys[key] = event
        self.events.append(event)

    # ------------------------------------------------------------------ locating
    def _first_outside(self, frame: Optional[types.FrameType]) -> Optional[types.FrameType]:
        """First frame not in torch / this package."""
        for f in iter_frames(frame):
            if self.classifier.kind(f.f_code.co_filename) in ("user", "library"):
                return f
        return None

    def _user_location(self, frame: Optional[types.FrameType]) -> Optional[SourceLocation]:
        """First user frame, else first library frame."""
        library = None
        for f in iter_frames(frame):
            kind = self.classifier.kind(f.f_code.co_filename)
            if kind == "user":
                return frame_location(f)
            if kind == "library" and library is None:
                library = f
        return frame_location(library) if library is not None else None

    def _scan(self, frame: types.FrameType) -> Optional[GradDisableSite]:
        key = (frame.f_code, frame.f_lineno)
        if key not in self._scan_cache:
            self._scan_cache[key] = scan_frame(frame)
        return self._scan_cache[key]

    def locate_disable(
        self,
        frame: types.FrameType,
        stop_module_id: Optional[int],
        skip_module: Optional[nn.Module],
    ) -> DisableInfo:
        """Walk outward from ``frame`` to find what disabled grad.

        Args:
            frame: innermost frame to start from (inside the transition).
            stop_module_id: the module whose call had grad enabled (the parent);
                the walk stops at its ``_call_impl`` frame.
            skip_module: a module whose own ``_call_impl`` frame is at the start of
                the walk (the child being entered).

        Returns:
            The site (or checkpoint) and the user's call site into it.
        """
        info = DisableInfo()
        site_frame: Optional[types.FrameType] = None
        for f in iter_frames(frame):
            code = f.f_code
            if code is _CHECKPOINT_FORWARD_CODE:
                info.checkpoint = self._checkpoint_info(f)
                return info
            if code in _CALL_IMPL_CODES:
                owner = f.f_locals.get("self")
                if owner is not None and owner is not skip_module and id(owner) == stop_module_id:
                    break
                continue
            kind = self.classifier.kind(code.co_filename)
            if kind not in ("user", "library"):
                continue
            site = self._scan(f)
            if site is not None:
                info.site = site
                info.site_kind = kind
                site_frame = f
                break
        if info.site is None:
            # Fall back on the last recorded switch to "disabled" (e.g. a helper that
            # called set_grad_enabled(False) and returned).
            for location, enabled, _ in reversed(self.grad_switches):
                if not enabled and location is not None:
                    info.site = GradDisableSite("set_grad_enabled", "call", location, location.code or "")
                    info.site_kind = self.classifier.kind(location.file)
                    break
        if info.site is not None and info.site_kind != "user":
            start = site_frame if site_frame is not None else frame
            for f in iter_frames(start):
                if self.classifier.kind(f.f_code.co_filename) == "user":
                    info.user_call_site = frame_location(f)
                    break
        return info

    def _checkpoint_info(self, frame: types.FrameType) -> CheckpointInfo:
        args = frame.f_locals.get("args", ())
        requires = any(t.requires_grad for t in iter_tensors(args, depth=2))
        call_site = None
        user_site = None
        for f in iter_frames(frame.f_back):
            kind = self.classifier.kind(f.f_code.co_filename)
            if kind in ("user", "library") and call_site is None:
                call_site = frame_location(f)
            if kind == "user":
                user_site = frame_location(f)
                break
        return CheckpointInfo(call_site or user_site, user_site, requires)

    # ------------------------------------------------------------------ queries
    def transition_of(self, index: int) -> Optional[ModuleCall]:
        """The nearest ancestor-or-self call at which grad became disabled, if any."""
        call: Optional[ModuleCall] = self.calls[index]
        while call is not None:
            if call.disable is not None:
                return call
            call = self.calls[call.parent] if call.parent is not None else None
        return None

    def active_calls(self) -> list[int]:
        """Calls entered but not exited (non-empty after a forward that raised)."""
        return [c.index for c in self.calls if not c.finished]

    def release(self) -> None:
        """Drop references to graph nodes and tensors (call when done)."""
        for call in self.calls:
            call.input_sources = []
            call.output_nodes = []
        for event in self.events:
            event.sources = []
        self.requires_grad_sites = []


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


__all__ = [
    "CheckpointInfo",
    "CutEvent",
    "DisableInfo",
    "FailedOp",
    "ForwardTrace",
    "ModuleCall",
    "iter_tensors",
    "op_name",
]
