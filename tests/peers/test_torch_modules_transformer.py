"""PyTorch's generic module tests (``test/test_modules.py``) for ``TransformerEncoderLayer``, on ours.

Sources: pytorch ``torch/testing/_internal/common_modules.py``
(``module_inputs_torch_nn_TransformerEncoderLayer``, its ``ModuleInfo`` entry and
``no_batch_dim_reference_fn``) and ``test/test_modules.py`` (class ``TestModule``; each test
names its test). ``residual.models.TransformerEncoderLayer`` stands in for
``torch.nn.TransformerEncoderLayer`` (same constructor and forward); the inputs are torch's,
unchanged. Device: CPU, dtypes float32 and float64 (the ModuleInfo default), train and eval.

torch's ``@modules`` harness lives in ``torch.testing._internal``, which needs torch's own test
dependencies; its pieces are written out below (stand-ins): ``FunctionInput`` /
``ModuleInput``, ``freeze_rng_state`` (save and restore the CPU RNG), ``mock_wrapper`` and
``get_tensors_from`` (as in ``common_utils``), ``gradcheck`` (``common_utils``' defaults:
``check_batched_grad=True, fast_mode=True``) and ``assert_metadata_eq`` (shape, dtype, stride,
requires_grad, as ``torch._subclasses.meta_utils`` compares them for parameters).
``test_pickle`` loads with ``weights_only=False`` (a whole module; torch >= 2.6 defaults to
weights only).

Deliberate differences: none; every ported check passes. Skipped as torch skips them here:
``test_gradgrad`` (the ModuleInfo skips it on CPU: SDPA has no double backward there), and the
CUDA-only ``test_multiple_device_transfer`` and ``test_cpu_gpu_parity`` where CUDA is absent
(ported in full; not yet run on a GPU). Not ported: ``test_memory_format`` (the ModuleInfo skips
it for this layer: no channels_last), ``test_check_inplace`` (only for modules with an
``inplace`` argument), ``test_errors`` (torch gives this layer no error inputs), ``test_to``
(newer than the ``test_modules.py`` read here).
"""

# ruff: noqa: B023 (torch's gradcheck closure reads the loop's variables within one iteration)
from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial, wraps
from inspect import isgenerator
from itertools import chain, product
from operator import methodcaller
from typing import Any
from unittest.mock import MagicMock, patch

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor
from torch.testing import make_tensor

from residual.models import TransformerEncoderLayer

module_cls = TransformerEncoderLayer  # torch.nn.TransformerEncoderLayer in torch's ModuleInfo
train_and_eval_differ = True  # torch's ModuleInfo entry
DTYPES = [torch.float32, torch.float64]
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
device = "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="onlyCUDA in torch's test")


# --- stand-ins for torch.testing._internal ------------------------------------------------------
@dataclass
class FunctionInput:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


@dataclass
class ModuleInput:
    constructor_input: FunctionInput
    forward_input: FunctionInput | None = None
    desc: str = ""
    reference_fn: Callable[..., Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.reference_fn is not None:  # common_modules binds a copy of the parameters
            fn = self.reference_fn

            @wraps(fn)
            def copy_reference_fn(m: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                args, kwargs = deepcopy(args), deepcopy(kwargs)
                return fn(m, list(m.parameters()), *args, **kwargs)

            self.reference_fn = copy_reference_fn


@contextlib.contextmanager
def freeze_rng_state() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def mock_wrapper(method: Callable[..., Any]) -> Any:
    mock = MagicMock()

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        mock(*args, **kwargs)
        return method(self, *args, **kwargs)

    wrapper.mock = mock  # type: ignore[attr-defined]
    return wrapper


def get_tensors_from(args: Any, kwargs: Any) -> set[Tensor]:
    return {arg for arg in args if isinstance(arg, Tensor)}.union(
        {v for v in kwargs.values() if isinstance(v, Tensor)}
    )


def gradcheck(fn: Callable[..., Any], inputs: Any, **kwargs: Any) -> bool:
    for key, value in {"check_batched_grad": True, "fast_mode": True}.items():
        kwargs[key] = kwargs.get(key) if kwargs.get(key) is not None else value
    return torch.autograd.gradcheck(fn, inputs, **kwargs)


def gradgradcheck(fn: Callable[..., Any], inputs: Any, **kwargs: Any) -> bool:
    for key, value in {"check_batched_grad": True, "fast_mode": True}.items():
        kwargs[key] = kwargs.get(key) if kwargs.get(key) is not None else value
    return torch.autograd.gradgradcheck(fn, inputs, **kwargs)


def assert_metadata_eq(p_meta: Tensor, p_cpu: Tensor) -> None:
    assert p_meta.shape == p_cpu.shape
    assert p_meta.dtype == p_cpu.dtype
    assert p_meta.stride() == p_cpu.stride()
    assert p_meta.requires_grad == p_cpu.requires_grad


def assert_equal(a: Any, b: Any, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """TestCase.assertEqual for tensors and (nested) sequences of them (None == None).

    Its default tolerances are at least TestModule's ``precision = 1e-5``, ``rel_tol = 1e-5``.
    """
    torch.testing.assert_close(a, b, equal_nan=True, atol=atol, rtol=rtol)


# --- common_modules.py: no_batch_dim_reference_fn ------------------------------------------------
def no_batch_dim_reference_fn(m: Any, p: Any, *args: Any, **kwargs: Any) -> Any:
    def get_and_pop(key: str, default: Any) -> Any:
        v = kwargs.get(key, default)
        if key in kwargs:
            kwargs.pop(key)
        return v

    batch_dim = 0 if get_and_pop("batch_first", True) else 1
    kwargs_to_batchify = get_and_pop("kwargs_to_batchify", None)
    get_and_pop("is_criterion", False)

    if kwargs_to_batchify is not None:
        assert isinstance(kwargs_to_batchify, dict)
        for k, v in kwargs.items():
            if k in kwargs_to_batchify and v is not None:
                bdim = kwargs_to_batchify[k]
                kwargs[k] = v.unsqueeze(bdim)

    single_batch_input_args = [input.unsqueeze(batch_dim) for input in args]
    with freeze_rng_state():
        output = m(*single_batch_input_args, **kwargs).squeeze(batch_dim)
    return output


# --- common_modules.py: module_inputs_torch_nn_TransformerEncoderLayer ---------------------------
def module_inputs_torch_nn_TransformerEncoderLayer(
    module_info: Any, device: Any, dtype: Any, requires_grad: bool, training: bool, **kwargs: Any
) -> list[ModuleInput]:
    make_input = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)

    samples = [
        ModuleInput(
            constructor_input=FunctionInput(4, 2, 16, 0.0),
            forward_input=FunctionInput(make_input((2, 3, 4))),
            desc="relu_activation",
        ),
        ModuleInput(
            constructor_input=FunctionInput(4, 2, 8, 0.0, F.gelu),
            forward_input=FunctionInput(make_input((2, 3, 4))),
            desc="gelu_activation",
        ),
        ModuleInput(
            constructor_input=FunctionInput(4, 2, 8, 0.0, bias=False),
            forward_input=FunctionInput(make_input((2, 3, 4))),
            desc="no_bias",
        ),
    ]

    # Samples below are for validating the no-batch-dim support.
    key_padding_masks = (None, torch.tensor([False, False, True], device=device, dtype=torch.bool))
    attn_masks = (
        None,
        torch.tensor([False, False, True], device=device, dtype=torch.bool).expand((3, 3)),
    )
    for src_mask, src_key_padding_mask, norm_first, batch_first, bias in itertools.product(
        attn_masks, key_padding_masks, (True, False), (True, False), (True, False)
    ):
        samples.append(
            ModuleInput(
                constructor_input=FunctionInput(
                    d_model=4,
                    nhead=2,
                    dim_feedforward=8,
                    dropout=0.0,
                    batch_first=batch_first,
                    norm_first=norm_first,
                    bias=bias,
                ),
                forward_input=FunctionInput(
                    make_input((3, 4)), src_mask=src_mask, src_key_padding_mask=src_key_padding_mask
                ),
                reference_fn=partial(
                    no_batch_dim_reference_fn,
                    batch_first=batch_first,
                    kwargs_to_batchify={"src_key_padding_mask": 0},
                ),
                desc=f"no_batch_dim_batch_first_{batch_first}",
            )
        )

    # Samples below where we pass reference_fn are for validating the fast path,
    # since the fast path requires no_grad mode, we run the fast path in .eval()
    # and no_grad() in the reference_fn and verify that against the results in train mode.
    def fast_path_reference_fn(module: Any, parameters: Any, *args: Any, **kwargs: Any) -> Any:
        assert module.training
        module.train(False)
        with torch.no_grad():
            output = module(*args, **kwargs)
        module.train(True)
        return output

    if training:
        for norm_first, bias in itertools.product((True, False), (True, False)):
            samples.append(
                ModuleInput(
                    constructor_input=FunctionInput(
                        4, 2, 8, dropout=0.0, batch_first=True, norm_first=norm_first, bias=bias
                    ),
                    forward_input=FunctionInput(make_input((2, 3, 4))),
                    # fastpath doesn't run when bias=False
                    reference_fn=fast_path_reference_fn if bias else None,
                    desc=f"fastpath_{bias}_norm_first_{norm_first}",
                )
            )

    return samples


module_inputs_func = partial(module_inputs_torch_nn_TransformerEncoderLayer, None)


def _assert_module_parameters_and_buffer_are(module: Any, device: Any, dtype: Any) -> None:
    # Source: test/test_modules.py, TestModule._assert_module_parameters_and_buffer_are
    if not isinstance(device, torch.device):
        device = torch.device(device)

    def _check_module(items: Any, name: str) -> None:
        for item_name, item in items:
            assert item.device == device, f"{name} {item_name} is on device {item.device}"
            if item.dtype.is_floating_point:
                assert item.dtype == dtype, f"{name} {item_name} is of dtype {item.dtype}"

    _check_module(module.named_parameters(), "Parameter")
    _check_module(module.named_buffers(), "Buffer")


@DTYPE
@TRAINING
def test_forward(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_forward
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    dtype_to_method_caller = {
        torch.float32: methodcaller("float"),
        torch.float64: methodcaller("double"),
    }
    for module_input in module_inputs:
        if module_input.forward_input is None:
            continue

        with freeze_rng_state():
            # === Instantiate the module. ===
            args, kwargs = (
                module_input.constructor_input.args,
                module_input.constructor_input.kwargs,
            )
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)

            # === Do forward pass. ===
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            outputs = m(*args, **kwargs)

            # === Compare outputs to a reference if one is specified. ===
            reference_fn = module_input.reference_fn
            if reference_fn is not None:
                ref_outputs = reference_fn(m, *args, **kwargs)
                assert_equal(outputs, ref_outputs)

            # === Use the method call and verify the parameters and buffers ===
            if dtype in dtype_to_method_caller:
                dtype_to_method_caller[dtype](m)
                m(*args, **kwargs)
                _assert_module_parameters_and_buffer_are(m, device, dtype)


@DTYPE
@TRAINING
def test_factory_kwargs(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_factory_kwargs
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    for module_input in module_inputs:
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs

        # Check if this module creates parameters or registers buffers.
        module_creates_params_or_buffers = False
        parameter_new = mock_wrapper(torch.nn.Parameter.__new__)
        with patch.object(torch.nn.Parameter, "__new__", parameter_new):
            register_buffer = mock_wrapper(torch.nn.Module.register_buffer)
            with patch.object(torch.nn.Module, "register_buffer", register_buffer):
                m = module_cls(*args, **kwargs)
                m.train(training)

                # Check if a parameter or buffer was created with a tensor not passed to the
                # constructor.
                constructor_tensors = get_tensors_from(args, kwargs)
                for mock in [parameter_new.mock, register_buffer.mock]:
                    for call_args, call_kwargs in mock.call_args_list:
                        call_tensors = get_tensors_from(call_args, call_kwargs)
                        if len(call_tensors) > 0 and not constructor_tensors.intersection(
                            call_tensors
                        ):
                            module_creates_params_or_buffers = True
                            break

        if not module_creates_params_or_buffers:
            continue

        # Instantiate module with the factory kwargs.
        kwargs.update({"device": device, "dtype": dtype})
        m = module_cls(*args, **kwargs)
        m.train(training)
        _assert_module_parameters_and_buffer_are(m, device, dtype)


@CUDA
@DTYPE
@TRAINING
def test_multiple_device_transfer(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_multiple_device_transfer (onlyCUDA)
    device = "cuda"
    module_inputs_device = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    module_inputs_cpu = module_inputs_func(
        device="cpu", dtype=dtype, requires_grad=False, training=training
    )
    for module_input_device, module_input_cpu in zip(
        module_inputs_device, module_inputs_cpu, strict=True
    ):
        if module_input_device.forward_input is None:
            continue

        with freeze_rng_state():
            # === Instantiate the module. ===
            args = module_input_device.constructor_input.args
            kwargs = module_input_device.constructor_input.kwargs
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)

            # === Do forward pass on GPU ===
            input_device_args = module_input_device.forward_input.args
            input_device_kwargs = module_input_device.forward_input.kwargs
            m(*input_device_args, **input_device_kwargs)
            _assert_module_parameters_and_buffer_are(m, torch.device(device, 0), dtype)

            # === Move to CPU ===
            assert module_input_cpu.forward_input is not None
            input_cpu_args = module_input_cpu.forward_input.args
            input_cpu_kwargs = module_input_cpu.forward_input.kwargs
            m.cpu()
            m(*input_cpu_args, **input_cpu_kwargs)
            _assert_module_parameters_and_buffer_are(m, "cpu", dtype)

            # === Move back to GPU and forward pass ===
            m.cuda()
            m(*input_device_args, **input_device_kwargs)
            _assert_module_parameters_and_buffer_are(m, torch.device(device, 0), dtype)


@DTYPE
@TRAINING
def test_repr(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_repr
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    for module_input in module_inputs:
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)

        # Check that these methods do not raise errors
        m.__repr__()
        str(m)


@DTYPE
@TRAINING
def test_pickle(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_pickle
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    for module_input in module_inputs:
        if module_input.forward_input is None:
            continue

        with freeze_rng_state():
            # === Instantiate the module. ===
            args, kwargs = (
                module_input.constructor_input.args,
                module_input.constructor_input.kwargs,
            )
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)

            # === Do forward pass. ===
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            output = m(*args, **kwargs)

            # === Check unpickled module gives the same output. ===
            with tempfile.TemporaryFile() as f:
                torch.save(m, f)
                f.seek(0)
                m_copy = torch.load(f, weights_only=False)
                output_from_copy = m_copy(*args, **kwargs)
                assert_equal(output, output_from_copy)


def _traverse_obj(obj: Any, func: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, tuple | list):
        return type(obj)(_traverse_obj(o, func) for o in obj)
    elif isgenerator(obj):
        return tuple(_traverse_obj(o, func) for o in obj)
    elif isinstance(obj, dict):
        return {name: _traverse_obj(o, func) for name, o in obj.items()}
    elif isinstance(obj, torch.Tensor | torch.nn.Parameter):
        return func(obj)
    return None


def _retain_grad(obj: Any) -> None:
    def inner_retain_grad(obj: Tensor) -> None:
        if obj.requires_grad:
            obj.retain_grad()

    _traverse_obj(obj, inner_retain_grad)


def _get_grads(obj: Any) -> Any:
    def inner_get_grad(obj: Tensor) -> Any:
        if obj.requires_grad:
            return obj.grad
        return None

    return _traverse_obj(obj, inner_get_grad)


def _zero_grad(obj: Any) -> None:
    def inner_zero_grad(obj: Tensor) -> None:
        if obj.grad is not None:
            obj.grad = None

    _traverse_obj(obj, inner_zero_grad)


@DTYPE
@TRAINING
def test_non_contiguous_tensors(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_non_contiguous_tensors
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=True, training=training
    )

    def _make_non_contiguous(obj: Any) -> Any:
        def inner_make_non_contiguous(obj: Any) -> Any:
            # Scalar tensors can not be made non-contiguous
            if not isinstance(obj, torch.Tensor) or obj.dim() == 0:
                return obj

            out = torch.repeat_interleave(obj, 2, dim=-1)
            out = out[..., ::2].detach()
            out.requires_grad = obj.requires_grad
            return out

        return _traverse_obj(obj, inner_make_non_contiguous)

    def _can_be_noncontiguous(obj: Any) -> bool:
        if isinstance(obj, tuple | list):
            return any(_can_be_noncontiguous(o) for o in obj)
        elif isinstance(obj, dict):
            return any(_can_be_noncontiguous(o) for o in obj.values())
        # scalar tensors can not be non-contiguous
        return isinstance(obj, torch.Tensor) and obj.dim() != 0

    for module_input in module_inputs:
        if module_input.forward_input is None:
            continue

        input_args, input_kwargs = (
            module_input.forward_input.args,
            module_input.forward_input.kwargs,
        )
        if not (_can_be_noncontiguous(input_args) or _can_be_noncontiguous(input_kwargs)):
            continue

        # === Instantiate the module. ===
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)

        _retain_grad((input_args, input_kwargs))

        # === Forward with default input
        with freeze_rng_state():
            default_output = m(*input_args, **input_kwargs)
            assert isinstance(default_output, torch.Tensor)  # torch also handles tuples
            grad_output = default_output.clone().detach_().normal_()
            default_output.backward(grad_output, retain_graph=True)

        default_input_args_grad, default_input_kwargs_grad = deepcopy(
            _get_grads((input_args, input_kwargs))
        )
        default_param_grad = deepcopy([p.grad for p in m.parameters()])

        # === Construct non-contiguous tensors ===
        nc_input_args, nc_input_kwargs = _make_non_contiguous((input_args, input_kwargs))
        nc_grad_output = _make_non_contiguous(grad_output)

        # === Compare results with non-contiguous and contiguous tensors ===
        inputs = [(input_args, input_kwargs), (nc_input_args, nc_input_kwargs)]
        grads = [grad_output, nc_grad_output]

        for (in_args, in_kwargs), g_out in product(inputs, grads):
            g_out_copy = deepcopy(g_out)
            _zero_grad((in_args, in_kwargs))
            _zero_grad(m.parameters())

            with freeze_rng_state():
                out = m(*in_args, **in_kwargs)
                out.backward(g_out_copy, retain_graph=True)

            input_args_grad, input_kwargs_grad = _get_grads((in_args, in_kwargs))
            assert_equal(out, default_output)
            assert_equal(input_args_grad, default_input_args_grad, atol=1e-4, rtol=0)
            assert_equal(input_kwargs_grad, default_input_kwargs_grad, atol=1e-4, rtol=0)

            param_grad = [p.grad for p in m.parameters()]
            assert_equal(param_grad, default_param_grad)


def _test_gradients_helper(dtype: torch.dtype, training: bool, check: Callable[..., bool]) -> None:
    # Source: pytorch test/test_modules.py, TestModule._test_gradients_helper
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=True, training=training
    )
    gradcheck_nondet_tol = 0.0

    for module_input in module_inputs:
        if module_input.forward_input is None:
            continue

        # === Instantiate the module. ===
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)

        params = tuple(m.parameters())

        input_args, input_kwargs = (
            module_input.forward_input.args,
            module_input.forward_input.kwargs,
        )

        # === Perform gradient check on the input_args ===
        other_kwargs = {}
        kwarg_tensors = []
        for name, obj in input_kwargs.items():
            if isinstance(obj, torch.Tensor):
                kwarg_tensors.append((name, obj))
            else:
                other_kwargs[name] = obj

        def fn_to_gradcheck(*flat_input_and_params: Any) -> Any:
            input_and_params = pytree.tree_unflatten(flat_input_and_params, flat_spec)
            new_input_args = input_and_params[: len(input_args)]
            kwarg_args = input_and_params[-len(kwarg_tensors) :]
            new_kwargs = {
                name: obj for (name, _), obj in zip(kwarg_tensors, kwarg_args, strict=False)
            }

            with freeze_rng_state():
                output = m(*new_input_args, **new_kwargs, **other_kwargs)
                output_flattened, _ = pytree.tree_flatten(output)
                return output_flattened

        # check total derivative
        grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
        flat_input, flat_spec = pytree.tree_flatten(grad_input)

        assert check(fn_to_gradcheck, flat_input, nondet_tol=gradcheck_nondet_tol)

        # check partial derivatives
        old_params_requires_grad = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad = False

        old_kwargs_requires_grad = [obj.requires_grad for (_, obj) in kwarg_tensors]
        for _, obj in kwarg_tensors:
            obj.requires_grad = False

        for p, old in zip(params, old_params_requires_grad, strict=True):
            p.requires_grad = old
            grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
            flat_input, flat_spec = pytree.tree_flatten(grad_input)
            assert check(fn_to_gradcheck, flat_input, nondet_tol=gradcheck_nondet_tol)
            p.requires_grad = False

        for (_, obj), old in zip(kwarg_tensors, old_kwargs_requires_grad, strict=True):
            obj.requires_grad = old
            grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
            flat_input, flat_spec = pytree.tree_flatten(grad_input)
            assert check(fn_to_gradcheck, flat_input, nondet_tol=gradcheck_nondet_tol)
            obj.requires_grad = False


@TRAINING
def test_grad(training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_grad (allowed_dtypes=[torch.double])
    _test_gradients_helper(torch.double, training, gradcheck)


@pytest.mark.skip(reason="torch's ModuleInfo skips it on CPU: SDPA has no double backward there")
@TRAINING
def test_gradgrad(training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_gradgrad (allowed_dtypes=[torch.double])
    _test_gradients_helper(torch.double, training, gradgradcheck)


@CUDA
@DTYPE
@TRAINING
def test_cpu_gpu_parity(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_cpu_gpu_parity (onlyCUDA, TF32 off,
    # tolerances float32 5e-2, float64 4e-4)
    device = "cuda"
    atol = {torch.float32: 5e-2, torch.float64: 4e-4}[dtype]
    module_inputs_cpu = module_inputs_func(
        device="cpu", dtype=dtype, requires_grad=True, training=training
    )

    def _to_device(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            res = obj.detach().to(device=device)
            res.requires_grad = obj.requires_grad
            return res
        elif isinstance(obj, tuple):
            return tuple(_to_device(o) for o in obj)
        elif isinstance(obj, dict):
            return {key: _to_device(o) for key, o in obj.items()}
        else:
            return deepcopy(obj)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for module_input in module_inputs_cpu:
            assert module_input.forward_input is not None
            # === Move input from cpu to device ===
            cpu_forward_args = module_input.forward_input.args
            cpu_forward_kwargs = module_input.forward_input.kwargs

            gpu_forward_args, gpu_forward_kwargs = _to_device(
                (cpu_forward_args, cpu_forward_kwargs)
            )

            _retain_grad(
                (cpu_forward_args, cpu_forward_kwargs, gpu_forward_args, gpu_forward_kwargs)
            )

            # === Construct module on cpu and gpu ===
            args, kwargs = (
                module_input.constructor_input.args,
                module_input.constructor_input.kwargs,
            )

            cpu_module = module_cls(*args, **kwargs).to(dtype).to("cpu")
            cpu_module.train(training)
            gpu_module = module_cls(*args, **kwargs).to(dtype).to(device)
            gpu_module.train(training)

            for cpu_p, gpu_p in zip(cpu_module.parameters(), gpu_module.parameters(), strict=True):
                gpu_p.data.copy_(cpu_p)

            # === Compare forward output between cpu and gpu ===
            cpu_outputs = cpu_module(*cpu_forward_args, **cpu_forward_kwargs)
            gpu_outputs = gpu_module(*gpu_forward_args, **gpu_forward_kwargs)

            assert_equal(cpu_outputs, gpu_outputs.cpu(), atol=atol, rtol=0)

            # === Run backwards on CPU and GPU and compare results ===
            def check_backward(cpu_output: Tensor, gpu_output: Tensor) -> None:
                cpu_grad_output = cpu_output.clone().normal_()
                gpu_grad_output = cpu_grad_output.type_as(gpu_output)

                cpu_output.backward(cpu_grad_output, retain_graph=True)
                gpu_output.backward(gpu_grad_output, retain_graph=True)

                cpu_grad_input = _get_grads(cpu_forward_args)
                gpu_grad_input = _traverse_obj(_get_grads(gpu_forward_args), Tensor.cpu)
                assert_equal(cpu_grad_input, gpu_grad_input, atol=atol, rtol=0)

                for cpu_p, gpu_p in zip(
                    cpu_module.parameters(), gpu_module.parameters(), strict=True
                ):
                    assert_equal(cpu_p.grad, gpu_p.grad.cpu(), atol=atol, rtol=0)

            for _ in range(5):
                check_backward(cpu_outputs, gpu_outputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@DTYPE
def test_if_train_and_eval_modes_differ(dtype: torch.dtype) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_if_train_and_eval_modes_differ
    # (TrainEvalMode.train_only)
    training = True
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )

    # Run forward inputs through to see if the training flag is accessed during forward.
    for module_input in module_inputs:
        if module_input.forward_input is None:
            continue

        # === Instantiate the module. ===
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)

        # Remove training attribute and see if forward still works.
        delattr(m, "training")

        # === Do forward pass. ===
        try:
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            m(*args, **kwargs)
        except AttributeError as e:
            if "'training'" in str(e):
                assert train_and_eval_differ
            else:
                raise e


@DTYPE
@TRAINING
def test_device_ctx_init(dtype: torch.dtype, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_device_ctx_init (onlyCPU)
    module_inputs = module_inputs_func(
        device=device, dtype=dtype, requires_grad=False, training=training
    )
    with torch.device("meta"):
        module_inputs_meta = module_inputs_func(
            device=None, dtype=dtype, requires_grad=False, training=training
        )

    for module_input, module_input_meta in zip(module_inputs, module_inputs_meta, strict=True):
        c_args, c_kwargs = (
            module_input.constructor_input.args,
            module_input.constructor_input.kwargs,
        )
        c_args_meta, c_kwargs_meta = (
            module_input_meta.constructor_input.args,
            module_input_meta.constructor_input.kwargs,
        )

        m_cpu = module_cls(*c_args, **c_kwargs)

        with torch.device("meta"):
            m = module_cls(*c_args_meta, **c_kwargs_meta)

        for p_meta, p_cpu in chain(
            zip(m.parameters(), m_cpu.parameters(), strict=True),
            zip(m.buffers(), m_cpu.buffers(), strict=True),
        ):
            if torch.nn.parameter.is_lazy(p_meta):
                continue
            assert p_meta.is_meta
            assert_metadata_eq(p_meta, p_cpu)


@TRAINING
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "no_swap"])
def test_to_empty(swap: bool, training: bool) -> None:
    # Source: pytorch test/test_modules.py, TestModule.test_to_empty
    # (allowed_dtypes=[torch.float32]; wrapSwapTensorsTest restores the swap flag)
    dtype = torch.float32
    with torch.device("meta"):
        module_inputs = module_inputs_func(
            device=None, dtype=dtype, requires_grad=False, training=training
        )

    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        device_ = torch.device(device)

        for module_input in module_inputs:
            c_args, c_kwargs = (
                module_input.constructor_input.args,
                module_input.constructor_input.kwargs,
            )

            with torch.device("meta"):
                m = module_cls(*c_args, **c_kwargs)

            p_ids_before = [id(p) for p in m.parameters()]
            p_cdatas_before = [p._cdata for p in m.parameters()]
            m.to_empty(device=device_)

            assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
            assert all(p.device == device_ for p in m.parameters())
            assert all(p.dtype == dtype for p in m.parameters())
            p_ids_after = [id(p) for p in m.parameters()]
            p_cdatas_after = [p._cdata for p in m.parameters()]

            if swap:
                # id same, ._cdata differs --> swapped cdata of THPVariable
                assert all(a == b for a, b in zip(p_ids_before, p_ids_after, strict=True))
                assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after, strict=True))
            else:
                # id and ._cdata differ
                assert all(a != b for a, b in zip(p_ids_before, p_ids_after, strict=True))
                assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after, strict=True))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
