"""The dual-branch transformer: zero-init, branch isolation, fast path, per-branch timesteps, training groups."""

import pytest
import torch

from bfs_core.models.dual_flux import (
    BranchLoRALinear,
    DualBranchConfig,
    DualBranchFlux,
    JointAttention,
    JointAttnProcessor,
    bfs_state_dict,
    parameter_group,
    patch_dual_branch,
    prepare_for_inference,
    reset_inference_state,
    set_trainable,
    unpatch_dual_branch,
)
from bfs_core.tiny import TINY_FLUX, dual_inputs, make_tiny_flux, randomize_bfs_parameters


PRESETS = [DualBranchConfig.release(), DualBranchConfig.paper()]


def plain_branch(transformer, latents, inputs, timestep):
    """Unpatched Flux-Fill on one branch alone (batch N), the reference the dual model must reproduce."""
    n = latents.shape[0]
    return transformer(
        hidden_states=torch.cat([latents, inputs["fill_cond"]], -1),
        encoder_hidden_states=inputs["prompt_embeds"],
        pooled_projections=inputs["pooled"],
        timestep=timestep,
        img_ids=inputs["img_ids"],
        txt_ids=torch.zeros(inputs["prompt_embeds"].shape[1], 3),
        guidance=torch.full((n,), 30.0),
        return_dict=False,
    )[0]


@torch.no_grad()
def run(model, inputs):
    return model(**inputs)


@pytest.mark.parametrize("config", PRESETS, ids=["release", "paper"])
def test_fresh_patch_gives_plain_flux_fill_on_both_branches(config):
    transformer = make_tiny_flux()
    inputs = dual_inputs(n=2)
    with torch.no_grad():
        ref_comp = plain_branch(transformer, inputs["comp_latents"], inputs, inputs["timestep_comp"])
        ref_fg = plain_branch(transformer, inputs["fg_latents"], inputs, inputs["timestep_fg"])
    v_comp, v_fg = run(DualBranchFlux(transformer, config), inputs)
    assert ref_comp.abs().mean() > 0.1  # the model is not trivially zero
    assert torch.equal(v_comp, ref_comp) or (v_comp - ref_comp).abs().max() < 1e-5
    assert (v_fg - ref_fg).abs().max() < 1e-5


def _joint_processor(block) -> bool:
    return isinstance(block.attn.get_processor(), JointAttnProcessor)


def test_presets_place_modules_as_documented():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    t = make_tiny_flux()
    patch_dual_branch(t, DualBranchConfig.release())
    # Stock block classes (diffusers' tools key off them); the joint module runs in the attention processor.
    assert all(type(b) is FluxTransformerBlock and _joint_processor(b) for b in t.transformer_blocks)
    assert all(type(b) is FluxSingleTransformerBlock and _joint_processor(b) for b in t.single_transformer_blocks)
    assert all(b.attn.get_processor().joint is b.joint for b in t.single_transformer_blocks)
    assert not any(isinstance(m, BranchLoRALinear) for m in t.modules())
    assert t.transformer_blocks[0].joint.to_out is not None and t.single_transformer_blocks[0].joint.to_out is None
    unpatch_dual_branch(t)
    patch_dual_branch(t, DualBranchConfig.paper())
    assert not any(hasattr(b, "joint") or _joint_processor(b) for b in t.transformer_blocks)
    assert all(_joint_processor(b) for b in t.single_transformer_blocks)
    lora = t.single_transformer_blocks[1].attn.to_q
    assert isinstance(lora, BranchLoRALinear) and lora.lora_A["comp"].weight.shape == (
        64,
        TINY_FLUX["attention_head_dim"] * 2,
    )


def test_unpatch_restores_modules_and_outputs():
    transformer = make_tiny_flux()
    inputs = dual_inputs()
    keys = set(transformer.state_dict())
    classes = [type(m) for m in transformer.modules()]
    processors = {name: type(p) for name, p in transformer.attn_processors.items()}
    with torch.no_grad():
        before = plain_branch(transformer, inputs["fg_latents"], inputs, inputs["timestep_fg"])
    patch_dual_branch(transformer, DualBranchConfig.paper())
    randomize_bfs_parameters(transformer, std=0.05)
    unpatch_dual_branch(transformer)
    assert set(transformer.state_dict()) == keys
    assert [type(m) for m in transformer.modules()] == classes
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == processors
    with torch.no_grad():
        after = plain_branch(transformer, inputs["fg_latents"], inputs, inputs["timestep_fg"])
    assert torch.equal(before, after)
    # A second, unrelated instance of the same classes was never touched.
    other = make_tiny_flux()
    assert not any(isinstance(m, BranchLoRALinear) for m in other.modules())
    assert not any(isinstance(p, JointAttnProcessor) for p in other.attn_processors.values())


def test_content_lora_of_one_branch_never_reaches_the_other_when_joint_is_zero():
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, DualBranchConfig.paper())
    inputs = dual_inputs(n=2)
    v_comp0, v_fg0 = run(model, inputs)
    randomize_bfs_parameters(transformer, std=0.05, groups=("comp",))
    v_comp1, v_fg1 = run(model, inputs)
    assert torch.equal(v_fg1, v_fg0)
    assert (v_comp1 - v_comp0).abs().max() > 1e-3
    randomize_bfs_parameters(transformer, seed=5, std=0.05, groups=("fg",))
    v_comp2, v_fg2 = run(model, inputs)
    assert torch.equal(v_comp2, v_comp1)
    assert (v_fg2 - v_fg1).abs().max() > 1e-3


def test_content_lora_isolation_holds_for_gradients():
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, DualBranchConfig.paper())
    randomize_bfs_parameters(transformer, std=0.05, groups=("comp", "fg"))
    set_trainable(transformer, {"comp", "fg"})
    _, v_fg = model(**dual_inputs())
    v_fg.square().mean().backward()  # a loss on fg rows only
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    assert all(g is None or not g.any() for n, g in grads.items() if parameter_group(n) == "comp")
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if parameter_group(n) == "fg")


@pytest.mark.parametrize("config", PRESETS, ids=["release", "paper"])
def test_joint_fast_path_equals_reference_path(config):
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, config)
    randomize_bfs_parameters(transformer, std=0.1)
    inputs = dual_inputs(n=2)
    fast = run(model, inputs)
    joints = [m for m in transformer.modules() if isinstance(m, JointAttention)]
    for joint in joints:
        joint.share_base_projections = False
    reference = run(model, inputs)
    for joint in joints:
        joint.share_base_projections = True
    # Both branches actually receive a message (the joint module is live).
    for joint in joints:
        joint.active = False
    without_joint = run(model, inputs)
    for f, r, w in zip(fast, reference, without_joint):
        assert (f - r).abs().max() < 1e-5
        assert (f - w).abs().max() > 1e-3


def test_folded_post_and_zero_skipping_match_the_unfolded_model():
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, DualBranchConfig.release())
    randomize_bfs_parameters(transformer, std=0.1)
    with torch.no_grad():  # the checkpoint leaves one module at zero: it must be skipped, numerics identical
        transformer.transformer_blocks[1].joint.post.weight.zero_()
    inputs = dual_inputs(n=2)
    reference = run(model, inputs)
    counts = prepare_for_inference(transformer)
    assert counts == {"active": 3, "skipped": 1}
    assert transformer.transformer_blocks[0].joint.folded
    folded = run(model, inputs)
    for f, r in zip(folded, reference):
        assert (f - r).abs().max() < 1e-5
    reset_inference_state(transformer)
    assert all(m.active and not m.folded for m in transformer.modules() if isinstance(m, JointAttention))


def test_joint_module_pairs_sample_k_with_sample_k():
    """Row k of comp must only exchange messages with row N + k of fg (no mixing between samples)."""
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, DualBranchConfig.release())
    randomize_bfs_parameters(transformer, std=0.1)
    inputs = dual_inputs(n=2)
    v_comp, v_fg = run(model, inputs)
    changed = dict(inputs, fg_latents=inputs["fg_latents"].clone())
    changed["fg_latents"][1] += 1.0  # perturb sample 1's foreground only
    w_comp, w_fg = run(model, changed)
    assert torch.equal(w_comp[0], v_comp[0]) and torch.equal(w_fg[0], v_fg[0])
    assert (w_comp[1] - v_comp[1]).abs().max() > 1e-4  # sample 1's composite hears its own foreground


@pytest.mark.parametrize("config", PRESETS, ids=["release", "paper"])
def test_per_branch_timestep_rows_equal_single_sample_runs(config):
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, config)
    randomize_bfs_parameters(transformer, std=0.1)
    inputs = dual_inputs(n=3)
    inputs["timestep_comp"] = torch.tensor([0.0, 0.3, 1.0])
    inputs["timestep_fg"] = torch.tensor([0.5, 0.9, 0.0])
    v_comp, v_fg = run(model, inputs)
    for k in range(3):
        alone = {name: (value[k : k + 1] if name != "img_ids" else value) for name, value in inputs.items()}
        a_comp, a_fg = run(model, alone)
        assert (a_comp[0] - v_comp[k]).abs().max() < 1e-5
        assert (a_fg[0] - v_fg[k]).abs().max() < 1e-5
    # The timestep really enters per row: the same sample at another comp timestep differs.
    other = dict(inputs, timestep_comp=torch.tensor([0.7, 0.3, 1.0]))
    assert (run(model, other)[0][0] - v_comp[0]).abs().max() > 1e-4


def test_gradients_flow_to_exactly_the_trainable_parameters():
    transformer = make_tiny_flux()
    transformer.enable_gradient_checkpointing()
    model = DualBranchFlux(transformer, DualBranchConfig.paper())
    randomize_bfs_parameters(transformer, std=0.05)
    for groups in ({"comp", "fg", "joint"}, {"comp"}, {"fg", "joint"}):
        transformer.zero_grad(set_to_none=True)
        params = set_trainable(transformer, groups)
        trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
        assert len(params) == len(trainable) > 0
        assert {parameter_group(n) for n in trainable} == groups
        v_comp, v_fg = model.train()(**dual_inputs())
        (v_comp.square().mean() + v_fg.square().mean()).backward()
        with_grad = {n for n, p in transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad == trainable
    assert all(parameter_group(n) != "base" for n in bfs_state_dict(transformer))


def test_bad_inputs_get_clear_errors():
    model = DualBranchFlux(make_tiny_flux(), DualBranchConfig.release())
    inputs = dual_inputs()
    with pytest.raises(ValueError, match=r"Text conditioning must be \[batch, tokens, 32\]"):
        run(model, dict(inputs, prompt_embeds=torch.randn(1, 6, 48)))
    with pytest.raises(ValueError, match="Pooled conditioning"):
        run(model, dict(inputs, pooled=torch.randn(1, 7)))
    with pytest.raises(ValueError, match="fill_cond"):
        run(model, dict(inputs, fill_cond=torch.randn(1, 16, 300)))
    with pytest.raises(ValueError, match="already patched"):
        patch_dual_branch(model.transformer, DualBranchConfig.release())
    with pytest.raises(ValueError, match="joint_placement"):
        DualBranchConfig(joint_placement="double")


def test_config_json_round_trip():
    for config in PRESETS:
        assert DualBranchConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        DualBranchConfig.from_json('{"rank": 3}')


def test_joint_attention_matches_equations_2_to_4_by_hand():
    """Each branch's queries (own tokens, own-branch LoRA) attend to the other branch's keys/values."""
    transformer = make_tiny_flux()
    patch_dual_branch(transformer, DualBranchConfig.release())
    randomize_bfs_parameters(transformer, std=0.2)
    block = transformer.single_transformer_blocks[0]
    attn, joint = block.attn, block.joint
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=gen)  # [comp; fg] rows, 5 tokens, D = 64
    with torch.no_grad():
        got = joint(x, attn, rope=None)

        def project(linear, lora, tokens, branch):
            a, b = lora.lora_A[branch].weight, lora.lora_B[branch].weight
            return tokens @ linear.weight.T + linear.bias + (tokens @ a.T) @ b.T

        def rms(t, weight):  # per head, over the head dimension
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        def message(q_tokens, q_branch, kv_tokens, kv_branch):
            q = project(attn.to_q, joint.to_q, q_tokens, q_branch).view(5, 2, 32).transpose(0, 1)
            k = project(attn.to_k, joint.to_k, kv_tokens, kv_branch).view(5, 2, 32).transpose(0, 1)
            v = project(attn.to_v, joint.to_v, kv_tokens, kv_branch).view(5, 2, 32).transpose(0, 1)
            q, k = rms(q, attn.norm_q.weight), rms(k, attn.norm_k.weight)
            weights = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1)
            return (weights @ v).transpose(0, 1).reshape(5, 64) @ joint.post.weight.T

        expected_comp = message(x[0], "comp", x[1], "fg")  # Z_{F->C}
        expected_fg = message(x[1], "fg", x[0], "comp")  # Z_{C->F}
    assert (got[0] - expected_comp).abs().max() < 1e-5
    assert (got[1] - expected_fg).abs().max() < 1e-5
    assert expected_comp.abs().mean() > 1e-3


def test_fp8_weight_storage_stays_close_to_bf16():
    from bfs_core.models.dual_flux import store_weights_in_fp8

    transformer = make_tiny_flux(dtype=torch.bfloat16)
    model = DualBranchFlux(transformer, DualBranchConfig.paper())
    randomize_bfs_parameters(transformer, std=0.05)
    prepare_for_inference(transformer)
    inputs = {
        k: v.to(torch.bfloat16) if k not in ("timestep_comp", "timestep_fg") else v
        for k, v in dual_inputs(n=1).items()
    }
    reference = run(model, inputs)
    store_weights_in_fp8(transformer)
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["single_transformer_blocks.0.proj_mlp.weight"] == torch.float8_e4m3fn
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if parameter_group(n) != "base")
    for ref, out in zip(reference, run(model, inputs)):
        relative = ((out - ref).float().norm() / ref.float().norm()).item()
        assert 0 < relative < 0.05


def test_paper_mlp_post_g_matches_a_hand_computation():
    """g([Z_{F->C}, Z_{C->F}]) = W2·gelu(W1·[z_to_comp | z_to_fg] + b1) + b2, split: first half to comp, rest to fg."""
    import math

    from bfs_core.models.dual_flux import JointPostMLP

    g = JointPostMLP(dim=2, hidden=2, like=torch.zeros(1))
    w1 = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, -1.0]]  # row 0 reads only z_to_comp[0]; row 1 only z_to_fg
    b1 = [0.5, -0.25]
    w2 = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -3.0]]
    b2 = [0.0, 0.1, 0.2, 0.3]
    with torch.no_grad():
        g.fc1.weight.copy_(torch.tensor(w1))
        g.fc1.bias.copy_(torch.tensor(b1))
        g.fc2.weight.copy_(torch.tensor(w2))
        g.fc2.bias.copy_(torch.tensor(b2))
    to_comp, to_fg = [0.3, -0.7], [1.1, 0.4]  # the messages arriving at the comp row (Z_{F->C}) and the fg row
    messages = torch.tensor([[to_comp], [to_fg]])  # [2N = 2, S = 1, D = 2]: comp rows, then fg rows

    def gelu(x):  # tanh approximation, written out
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = to_comp + to_fg  # the channel concat [Z_{F->C} | Z_{C->F}]
    hidden = [gelu(sum(w * v for w, v in zip(row, x)) + b) for row, b in zip(w1, b1)]
    out = [sum(w * h for w, h in zip(row, hidden)) + b for row, b in zip(w2, b2)]
    with torch.no_grad():
        got = g(messages)
    assert got.shape == (2, 1, 2)
    assert got[0, 0].tolist() == pytest.approx(out[:2], abs=1e-6)  # delta for the composite branch
    assert got[1, 0].tolist() == pytest.approx(out[2:], abs=1e-6)  # delta for the foreground branch
    # The two halves differ, so swapping either the concat or the split order cannot pass.
    assert abs(out[0] - out[2]) > 0.1 and abs(out[1] - out[3]) > 0.1


def test_regional_compile_reaches_the_patched_blocks():
    """diffusers' `compile_repeated_blocks` keys off block class names: with stock classes it compiles every block,
    and the joint processor traces as one graph (fullgraph=True: no graph break). Backend `eager` keeps it CPU-fast."""
    transformer = make_tiny_flux()
    model = DualBranchFlux(transformer, DualBranchConfig.release())
    randomize_bfs_parameters(transformer)
    prepare_for_inference(transformer)
    inputs = dual_inputs()
    reference = run(model, inputs)
    transformer.compile_repeated_blocks(backend="eager", fullgraph=True)
    compiled = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == TINY_FLUX["num_layers"] + TINY_FLUX["num_single_layers"]
    for out, ref in zip(run(model, inputs), reference):
        assert (out - ref).abs().max() < 1e-5


def test_complex_rope_is_bitwise_diffusers_apply_rotary_emb():
    """`apply_rope` (one complex multiply) must give exactly what diffusers' real-arithmetic RoPE gives, on Flux's own
    table, in fp32 and bf16 (CPU)."""
    from diffusers.models.embeddings import apply_rotary_emb

    from bfs_core.models.dual_flux import apply_rope, rope_table
    from bfs_core.sampling.flow_match import latent_image_ids

    transformer = make_tiny_flux()
    ids = torch.cat([torch.zeros(6, 3), latent_image_ids(8, 8)])
    rope = transformer.pos_embed(ids)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, ids.shape[0], 2, 32, generator=gen).to(dtype)
        expected = apply_rotary_emb(x, rope, sequence_dim=1)
        got = apply_rope(x, rope_table(rope))
        assert got.dtype == dtype and torch.equal(got, expected)
        assert (expected - x).abs().max() > 0.1  # the rotation is not the identity
    with pytest.raises(ValueError, match="repeat each"):
        rope_table((torch.rand(4, 8), torch.rand(4, 8)))


def _naive_block_attention(attn, joint, processor_original, hidden, context, rope, n):
    """What a joint block's attention must return, written plainly: the stock Flux processor for self-attention, plus
    for each sample k the cross-branch messages computed row by row (diffusers' RoPE, explicit softmax) and projected
    by the unfolded post, added where the release adds them."""
    from diffusers.models.embeddings import apply_rotary_emb

    stock = processor_original(attn, hidden, context, None, rope)
    heads, head_dim = attn.heads, attn.head_dim
    seq = hidden.shape[1]
    rope_rows = None if rope is None else tuple(t[-seq:] for t in rope)  # double blocks: image tokens only

    def project(linear, lora, tokens, branch):
        a, b = lora.lora_A[branch].weight, lora.lora_B[branch].weight
        return tokens @ linear.weight.T + linear.bias + lora.lora_scale * (tokens @ a.T) @ b.T

    def norm_rope(t, norm):
        t = t.view(1, seq, heads, head_dim)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        return t if rope_rows is None else apply_rotary_emb(t, rope_rows, sequence_dim=1)

    def message(q_tokens, q_branch, kv_tokens, kv_branch):
        q = norm_rope(project(attn.to_q, joint.to_q, q_tokens, q_branch), attn.norm_q)[0].transpose(0, 1)
        k = norm_rope(project(attn.to_k, joint.to_k, kv_tokens, kv_branch), attn.norm_k)[0].transpose(0, 1)
        v = project(attn.to_v, joint.to_v, kv_tokens, kv_branch).view(seq, heads, head_dim).transpose(0, 1)
        weights = torch.softmax(q @ k.transpose(1, 2) / head_dim**0.5, dim=-1)
        out = (weights @ v).transpose(0, 1).reshape(seq, heads * head_dim)
        if joint.to_out is not None:
            out = project(attn.to_out[0], joint.to_out, out, q_branch)
        return out

    to_comp = torch.stack([message(hidden[k], "comp", hidden[n + k], "fg") for k in range(n)])
    to_fg = torch.stack([message(hidden[n + k], "fg", hidden[k], "comp") for k in range(n)])
    if isinstance(joint.post, torch.nn.Linear):
        delta = torch.cat([to_comp, to_fg]) @ joint.post.weight.T
    else:  # the paper's g on the channel concat, split back
        g = joint.post
        both = torch.cat([to_comp, to_fg], dim=-1) @ g.fc1.weight.T + g.fc1.bias
        both = torch.nn.functional.gelu(both, approximate="tanh") @ g.fc2.weight.T + g.fc2.bias
        delta = torch.cat(both.chunk(2, dim=-1))
    if context is None:
        return stock + delta
    return stock[0] + delta, stock[1]


@pytest.mark.parametrize(
    "config, folded",
    [(DualBranchConfig.release(), False), (DualBranchConfig.release(), True), (DualBranchConfig.paper(), False)],
    ids=["release", "release-folded", "paper"],
)
def test_fast_joint_processor_equals_a_naive_implementation(config, folded):
    """The fused processor (shared base projections, complex RoPE, batched LoRA, folded post) against the naive
    per-sample formulas above, in a double and a single block, with norm weights that are not all ones."""
    transformer = make_tiny_flux()
    patch_dual_branch(transformer, config)
    randomize_bfs_parameters(transformer, std=0.1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    prepare_for_inference(transformer, fold=folded)
    n, text_len, image_len, dim = 2, 6, 16, 64
    from bfs_core.sampling.flow_match import latent_image_ids

    rope = transformer.pos_embed(torch.cat([torch.zeros(text_len, 3), latent_image_ids(8, 8)]))
    blocks = list(transformer.single_transformer_blocks)
    if config.joint_placement == "all":
        blocks = [transformer.transformer_blocks[0]] + blocks
    assert folded == blocks[0].joint.folded
    for block in blocks:
        double = block in transformer.transformer_blocks
        hidden = torch.randn(2 * n, image_len if double else text_len + image_len, dim, generator=gen)
        context = torch.randn(2 * n, text_len, dim, generator=gen) if double else None
        processor = block.attn.get_processor()
        with torch.no_grad():
            got = processor(block.attn, hidden, context, None, rope)
            expected = _naive_block_attention(block.attn, block.joint, processor.original, hidden, context, rope, n)
        got, expected = (got, expected) if double else ((got,), (expected,))
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert (g - e).abs().max() < 1e-5 * max(1.0, e.abs().max().item())
        stock = processor.original(block.attn, hidden, context, None, rope)
        assert (got[0] - (stock[0] if double else stock)).abs().max() > 1e-3  # the joint message is not zero


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_processor_self_attention_is_bitwise_the_stock_processor(grad):
    """With its joint module switched off, the processor (fused RMSNorm + RoPE into one buffer, no text/image cat)
    returns exactly what diffusers' FluxAttnProcessor returns, in inference (in-place path) and under autograd."""
    from bfs_core.models.dual_flux import rms_norm
    from bfs_core.sampling.flow_match import latent_image_ids

    transformer = make_tiny_flux()
    patch_dual_branch(transformer, DualBranchConfig.release())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    rope = transformer.pos_embed(torch.cat([torch.zeros(6, 3), latent_image_ids(8, 8)]))
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        block.joint.active = False
        double = block in transformer.transformer_blocks
        hidden = torch.randn(4, 16 if double else 22, 64, generator=gen, requires_grad=grad)
        context = torch.randn(4, 6, 64, generator=gen) if double else None
        processor = block.attn.get_processor()
        with torch.set_grad_enabled(grad):
            got, expected = (f(block.attn, hidden, context, None, rope) for f in (processor, processor.original))
        for g, e in zip(got, expected) if double else [(got, expected)]:
            assert torch.equal(g, e)
    norm, x = transformer.single_transformer_blocks[0].attn.norm_q, torch.randn(2, 5, 2, 32, generator=gen)
    buffer = torch.zeros(2, 7, 2, 32)
    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x), norm(x))
        rms_norm(norm, x, out=buffer[:, 1:6])
    assert torch.equal(buffer[:, 1:6], norm(x).detach()) and not buffer[:, [0, 6]].any()
