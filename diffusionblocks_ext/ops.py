"""The public ops. Each call validates its arguments once (reference.check_*), then runs
the compiled kernel for the tensor's device when there is one, else the reference.
Compiled ops live in the dispatcher as torch.ops.diffusionblocks.*; this file gives them
their fake (meta) implementations for torch.compile and their autograd formulas."""

import torch

from . import _checks as check
from . import _loader, _philox, reference
from .reference import SIGMA_DATA, P_MEAN, P_STD, broadcast_rows, acc_dtype

_C = _loader.load()
HAS_EXT = _C is not None
HAS_CUDA_KERNELS = HAS_EXT and bool(_C.has_cuda_kernels())


def backend(tensor: torch.Tensor) -> str:
    """Which implementation serves `tensor`: 'ext-cpu', 'ext-cuda' or 'reference'."""
    return _backend_for(tensor.device)


def _backend_for(device: torch.device) -> str:
    if HAS_EXT and device.type == "cpu":
        return "ext-cpu"
    if HAS_CUDA_KERNELS and device.type == "cuda":
        return "ext-cuda"
    return "reference"


def _python_checks_values(tensor: torch.Tensor) -> bool:
    """The CPU kernels check σ and class-index values themselves (same text); for CUDA
    tensors the check happens here, as the kernels cannot raise."""
    return backend(tensor) != "ext-cpu"


def _scaled(grad, coef, like):
    """coef (per row, acc dtype) times grad, in the dtype of `like`."""
    return (coef * grad.to(coef.dtype)).to(like.dtype)


def sample_sigma(n, sigma_lo, sigma_hi, *, seed=None, offset=0, p_mean=P_MEAN, p_std=P_STD,
                 device=None, dtype=torch.float32, generator=None):
    """n draws of σ from the log-normal truncated to [sigma_lo, sigma_hi] (docs/method.md §3)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if _backend_for(device) == "reference":
        return reference.sample_sigma(n, sigma_lo, sigma_hi, seed=seed, offset=offset, p_mean=p_mean,
                                      p_std=p_std, device=device, dtype=dtype, generator=generator)
    reference.check_sample_sigma(n, sigma_lo, sigma_hi, p_mean, p_std, dtype)
    seed = _philox.resolve_seed(seed, generator)
    out = torch.empty(n, dtype=dtype, device=device)  # the kernel computes in float64, stores in dtype
    torch.ops.diffusionblocks.sample_sigma_(out, float(sigma_lo), float(sigma_hi),
                                            _philox.as_int64("seed", seed), _philox.as_int64("offset", offset),
                                            float(p_mean), float(p_std))
    return out


def add_noise(y, sigma, *, seed=None, offset=0, sigma_data=SIGMA_DATA, generator=None):
    """(z, z_in): z = y + σ·ε, ε ~ N(0, I) from Philox (seed, offset); z_in = c_in(σ)·z.
    Differentiable in y."""
    if backend(y) == "reference":
        return reference.add_noise(y, sigma, seed=seed, offset=offset, sigma_data=sigma_data,
                                   generator=generator)
    reference.check_add_noise(y, sigma, sigma_data, values=_python_checks_values(y))
    seed = _philox.resolve_seed(seed, generator)
    return torch.ops.diffusionblocks.add_noise(y, sigma, _philox.as_int64("seed", seed),
                                               _philox.as_int64("offset", offset), float(sigma_data))


def denoise(F, z, sigma, *, sigma_data=SIGMA_DATA):
    """D = c_skip(σ)·z + c_out(σ)·F. Differentiable in F and z."""
    if backend(F) == "reference":
        return reference.denoise(F, z, sigma, sigma_data=sigma_data)
    reference.check_denoise(F, z, sigma, sigma_data, values=_python_checks_values(F))
    return torch.ops.diffusionblocks.denoise(F, z, sigma, float(sigma_data))


def euler_step(z, F, sigma, sigma_next, *, sigma_data=SIGMA_DATA, denoised=False):
    """z + (σ_next − σ)·(z − D)/σ in one pass, D = c_skip·z + c_out·F never materialised;
    with denoised=True, F already is D. Differentiable in z and F."""
    if backend(z) == "reference":
        return reference.euler_step(z, F, sigma, sigma_next, sigma_data=sigma_data, denoised=denoised)
    reference.check_euler_step(z, F, sigma, sigma_next, sigma_data, values=_python_checks_values(z))
    return torch.ops.diffusionblocks.euler_step(z, F, sigma, sigma_next, float(sigma_data), bool(denoised))


def heun_step(z, F, z_euler, F_euler, sigma, sigma_next, *, sigma_data=SIGMA_DATA, denoised=False):
    """Heun's second-order step from σ to σ_next > 0 in one pass, from the network output F
    at (z, σ) and F_euler at the Euler prediction (z_euler, σ_next)."""
    if backend(z) == "reference":
        return reference.heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data=sigma_data,
                                   denoised=denoised)
    reference.check_heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data,
                              values=_python_checks_values(z))
    return torch.ops.diffusionblocks.heun_step(z, F, z_euler, F_euler, sigma, sigma_next,
                                               float(sigma_data), bool(denoised))


def edm_loss(F, z, y, sigma, *, sigma_data=SIGMA_DATA):
    """Per-example [N] mean((F − (y − c_skip·z)/c_out)²) = λ(σ)·mean((D − y)²), accumulated
    in float32 (float64 for float64 inputs). Fused backward to F, z and y."""
    if backend(F) == "reference":
        return reference.edm_loss(F, z, y, sigma, sigma_data=sigma_data)
    reference.check_edm_loss(F, z, y, sigma, sigma_data, values=_python_checks_values(F))
    return torch.ops.diffusionblocks.edm_loss(F, z, y, sigma, float(sigma_data))


def weighted_cross_entropy(logits, target, weight, *, ignore_index=-100):
    """Per-example [N] weight·CE over logits [N, C] or [N, T, C] (summed over positions whose
    target is not ignore_index, divided by T). Fused log-softmax + NLL + weight and backward."""
    if backend(logits) == "reference":
        return reference.weighted_cross_entropy(logits, target, weight, ignore_index=ignore_index)
    reference.check_weighted_cross_entropy(logits, target, weight, ignore_index,
                                           values=_python_checks_values(logits))
    loss, _ = torch.ops.diffusionblocks.weighted_cross_entropy(logits, target, weight, int(ignore_index))
    return loss


def _refuse_gradients(ctx, names):
    """The dispatcher ops have no gradient for σ or the loss weight: refuse one as the
    public ops do, instead of leaving it silently None. `names`: input index -> name."""
    for index, name in names.items():
        if ctx.needs_input_grad[index]:
            check.refuse_gradient(name)


def _composite_grads(outputs, grads, inputs, needs):
    """Input gradients of the reference formulas (`outputs` recomputed from `inputs`) with
    a graph of their own: the backward for create_graph=True (double backward), since the
    fused backward kernels have no derivative. grads: one per output, None when unused."""
    used = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    wanted = [x for x, need in zip(inputs, needs) if need]
    result = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], create_graph=True,
                                      allow_unused=True))
    return [next(result) if need else None for need in needs]


def _register():
    """Fake implementations (shapes only, for torch.compile and the meta device) and
    autograd formulas. The fakes run the same argument checks as the kernels (values
    excepted), so a bad call fails alike while tracing, on meta tensors and for mixed
    devices (which dispatch to the fake). The backward of each linear op is its per-row
    coefficients times the incoming gradient, with the coefficients from reference.py
    (the formulas stay in one place)."""
    lib = "diffusionblocks::"

    @torch.library.register_fake(lib + "sample_sigma_")
    def _(out, sigma_lo, sigma_hi, seed, offset, p_mean, p_std):
        check.floating("out", out)
        return None

    @torch.library.register_fake(lib + "add_noise")
    def _(y, sigma, seed, offset, sigma_data):
        reference.check_add_noise(y, sigma, sigma_data, values=False)
        return torch.empty_like(y, memory_format=torch.contiguous_format), \
            torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "denoise")
    def _(F, z, sigma, sigma_data):
        reference.check_denoise(F, z, sigma, sigma_data, values=False)
        return torch.empty_like(F, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "euler_step")
    def _(z, F, sigma, sigma_next, sigma_data, denoised):
        reference.check_euler_step(z, F, sigma, sigma_next, sigma_data, values=False)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "heun_step")
    def _(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data, denoised):
        reference.check_heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data, values=False)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "edm_loss")
    def _(F, z, y, sigma, sigma_data):
        reference.check_edm_loss(F, z, y, sigma, sigma_data, values=False)
        return F.new_empty((F.shape[0],), dtype=acc_dtype(F.dtype))

    @torch.library.register_fake(lib + "edm_loss_backward")
    def _(grad, F, z, y, sigma, sigma_data, need_z, need_y):
        reference.check_edm_loss_backward(grad, F, z, y, sigma)

        def grad_like(needed):
            return torch.empty_like(F, memory_format=torch.contiguous_format) if needed else F.new_empty((0,))
        return grad_like(True), grad_like(need_z), grad_like(need_y)

    @torch.library.register_fake(lib + "weighted_cross_entropy")
    def _(logits, target, weight, ignore_index):
        reference.check_weighted_cross_entropy(logits, target, weight, ignore_index, values=False)
        acc = acc_dtype(logits.dtype)
        return logits.new_empty((logits.shape[0],), dtype=acc), logits.new_empty(logits.shape[:-1], dtype=acc)

    @torch.library.register_fake(lib + "weighted_cross_entropy_backward")
    def _(grad, logits, target, weight, lse, ignore_index):
        reference.check_cross_entropy_backward(grad, logits, target, weight, lse)
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # add_noise: z = y + σε, z_in = c_in·z  =>  dy = dz + c_in·dz_in
    def setup_add_noise(ctx, inputs, output):
        y, sigma, _, _, sigma_data = inputs
        _refuse_gradients(ctx, {1: "sigma"})
        ctx.save_for_backward(sigma)
        ctx.sigma_data = sigma_data
        ctx.y_dtype = y.dtype

    def backward_add_noise(ctx, grad_z, grad_z_in):
        (sigma,) = ctx.saved_tensors
        s = broadcast_rows(sigma, grad_z)
        grad_y = grad_z.to(s.dtype) + reference.c_in(s, ctx.sigma_data) * grad_z_in.to(s.dtype)
        return grad_y.to(ctx.y_dtype), None, None, None, None

    torch.library.register_autograd(lib + "add_noise", backward_add_noise, setup_context=setup_add_noise)

    def setup_denoise(ctx, inputs, output):
        F, z, sigma, sigma_data = inputs
        _refuse_gradients(ctx, {2: "sigma"})
        ctx.save_for_backward(sigma)
        ctx.sigma_data = sigma_data
        ctx.dtype = F.dtype

    def backward_denoise(ctx, grad):
        (sigma,) = ctx.saved_tensors
        s = broadcast_rows(sigma, grad)
        return (_scaled(grad, reference.c_out(s, ctx.sigma_data), grad),
                _scaled(grad, reference.c_skip(s, ctx.sigma_data), grad), None, None)

    torch.library.register_autograd(lib + "denoise", backward_denoise, setup_context=setup_denoise)

    def setup_step(ctx, inputs, output):
        *_, sigma, sigma_next, sigma_data, denoised = inputs
        first_sigma = len(inputs) - 4  # after the 2 (Euler) or 4 (Heun) state tensors
        _refuse_gradients(ctx, {first_sigma: "sigma", first_sigma + 1: "sigma_next"})
        ctx.save_for_backward(sigma, sigma_next)
        ctx.sigma_data, ctx.denoised = sigma_data, denoised

    def backward_euler(ctx, grad):
        sigma, sigma_next = ctx.saved_tensors
        a_z, a_f = reference.euler_coefficients(broadcast_rows(sigma, grad), broadcast_rows(sigma_next, grad),
                                                ctx.sigma_data, ctx.denoised)
        return _scaled(grad, a_z, grad), _scaled(grad, a_f, grad), None, None, None, None

    torch.library.register_autograd(lib + "euler_step", backward_euler, setup_context=setup_step)

    def backward_heun(ctx, grad):
        sigma, sigma_next = ctx.saved_tensors
        coefs = reference.heun_coefficients(broadcast_rows(sigma, grad), broadcast_rows(sigma_next, grad),
                                            ctx.sigma_data, ctx.denoised)
        return (*(_scaled(grad, c, grad) for c in coefs), None, None, None, None)

    torch.library.register_autograd(lib + "heun_step", backward_heun, setup_context=setup_step)

    def setup_edm_loss(ctx, inputs, output):
        F, z, y, sigma, sigma_data = inputs
        _refuse_gradients(ctx, {3: "sigma"})
        ctx.save_for_backward(F, z, y, sigma)
        ctx.sigma_data = sigma_data

    def backward_edm_loss(ctx, grad):
        F, z, y, sigma = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True
            loss = reference.edm_loss(F, z, y, sigma, sigma_data=ctx.sigma_data)
            return (*_composite_grads([loss], [grad], (F, z, y), needs), None, None)
        grad_F, grad_z, grad_y = torch.ops.diffusionblocks.edm_loss_backward(
            grad, F, z, y, sigma, ctx.sigma_data, needs[1], needs[2])
        return grad_F, grad_z if needs[1] else None, grad_y if needs[2] else None, None, None

    torch.library.register_autograd(lib + "edm_loss", backward_edm_loss, setup_context=setup_edm_loss)

    def setup_cross_entropy(ctx, inputs, output):
        logits, target, weight, ignore_index = inputs
        _refuse_gradients(ctx, {2: "weight"})
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    # Two differentiable outputs: the loss and lse = logsumexp(logits) per position (the
    # dispatcher op returns it for the backward; d lse/d logits = softmax(logits)).
    def backward_cross_entropy(ctx, grad, grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            outputs = (reference.weighted_cross_entropy(logits, target, weight, ignore_index=ctx.ignore_index),
                       torch.logsumexp(logits.to(lse.dtype), dim=-1))
            return _composite_grads(outputs, [grad, grad_lse], (logits,), (True,))[0], None, None, None
        grad_logits = None
        if grad is not None:
            grad_logits = torch.ops.diffusionblocks.weighted_cross_entropy_backward(
                grad, logits, target, weight, lse, ctx.ignore_index)
        if grad_lse is not None:
            from_lse = (torch.exp(logits.to(lse.dtype) - lse[..., None]) * grad_lse[..., None]).to(logits.dtype)
            grad_logits = from_lse if grad_logits is None else grad_logits + from_lse
        return grad_logits, None, None, None

    torch.library.register_autograd(lib + "weighted_cross_entropy", backward_cross_entropy,
                                    setup_context=setup_cross_entropy)


if HAS_EXT:
    _register()
