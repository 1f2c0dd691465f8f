"""The mutations of `make mutate` (tools/mutate.py): plausible one-line mistakes in the math.

One entry per line: M(file, exact original snippet (must occur once in the file), replacement,
tests to run, [equivalent="why no test can tell it apart"]). Tests run in the order given with
pytest -x: put the fastest test that should fail first. Sections per file; add report.py entries
in the REPORT section.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    equivalent: str = ""  # non-empty: the argument that no test can kill it


def M(file: str, original: str, replacement: str, *tests: str, equivalent: str = "") -> Mutation:
    return Mutation(file, original, replacement, tests, equivalent)


# test selections, fastest first
REF = "tests/test_reference_methods.py"
OPT = "tests/test_reference_optim.py"
ENG = "tests/test_engine.py"
COD = "tests/test_codes.py"
CMP = "tests/test_compressors.py"
STR = "tests/test_stragglers.py"
MOD = "tests/test_models.py"
RMD = "tests/test_reference_models.py"


def K(expr: str) -> str:
    """A pytest -k selection (applies to every test file of the mutation)."""
    return f"-k{expr}"


NOCNN = K("not cnn and not mnist5k")  # the MLP and GLM cases of test_models.py (the CNN ones are slow)

S = "cocoef_cli/sim/"
METHODS = [
    M(
        S + "methods.py",
        'self.alpha = need_num("method.alpha", alpha,',
        'self.alpha = 1.0 or need_num("method.alpha", alpha,',
        REF,
        K("diana"),
    ),
    M(S + "methods.py", "1.0 / (omega + 1.0)", "1.0 / (omega + 2.0)", OPT, K("diana")),
    M(S + "methods.py", "else aggregate(a, self.h + delta)", "else aggregate(a, delta)", REF, K("diana")),
    M(
        S + "methods.py",
        "self.h + self.alpha * delta, self.h)",
        "self.h - self.alpha * delta, self.h)",
        REF,
        K("diana"),
    ),
    M(
        S + "methods.py",
        "self.h + self.C.compress(U - self.h, self.rng)",
        "self.C.compress(U - self.h, self.rng)",
        REF,
        OPT,
        K("ef21"),
    ),
    M(
        S + "methods.py",
        "self.h + self.C.compress(U - self.h, self.rng)",
        "self.h + self.C.compress(U, self.rng)",
        REF,
        K("ef21"),
    ),
    M(S + "methods.py", "v.sub_(m.mul_(z.unsqueeze(-1)))", "v.sub_(m)", REF, K("coco_ef")),
    M(
        S + "compressors.py",
        "return v.scatter_add_(-1, idx, m.neg())",
        "return v.scatter_add_(-1, idx, m)",
        REF,
        K("coco_ef"),
    ),
    M(
        S + "methods.py",
        "m = vals.masked_fill(z.unsqueeze(-1).logical_not(), 0.0)",
        "m = vals",
        REF,
        K("coco_ef or ef_sgd"),
    ),
    M(S + "methods.py", "(m * a.unsqueeze(-1)).flatten(1)", "m.flatten(1)", REF, K("coco_ef")),
    M(
        S + "methods.py",
        "        if self.reset:\n            v.mul_",
        "        if False:\n            v.mul_",
        REF,
        K("reset"),
    ),
    M(S + "methods.py", "torch.zeros((), dtype=old.dtype) if self.reset else old", "old", REF, K("reset")),
    M(S + "methods.py", "return torch.bmm(a.unsqueeze(1), m).squeeze(1)", "return m.sum(1)", REF, K("gc or coco")),
    M(S + "methods.py", "return aggregate(a, self.C.compress(U, self.rng))", "return aggregate(a, U)", REF, K("coco-")),
    M(S + "methods.py", "self.e.add_(U)  # a straggler's u is 0", "self.e.copy_(U)", ENG, K("error_feedback")),
]
ENGINE = [
    M(S + "engine.py", "return lr / math.sqrt(t)", "return lr / t", OPT, K("inv_sqrt")),
    M(S + "engine.py", "** ((t - 1) // int(", "** (t // int(", OPT, K("step")),
    M(
        S + "engine.py",
        "g = self.buf.mul_(self.momentum).add_(g)",
        "g = self.buf.mul_(self.momentum).add_(g, alpha=1 - self.momentum)",
        OPT,
        K("schedule_and_momentum"),
    ),
    M(
        S + "engine.py",
        "self.bits += self.n_received * exp.bits_per_message",
        "self.bits += exp.code.M * exp.bits_per_message",
        REF,
        K("coco_ef-topk"),
    ),
    M(S + "engine.py", "self.theta = self.theta - step_size(", "self.theta = self.theta + step_size(", REF, K("gd")),
    M(S + "engine.py", "m.train_loss.double() - exp.f_star", "exp.f_star - m.train_loss.double()", REF, K("gd")),
    M(S + "engine.py", "if sim.t % every == 0 or sim.t == T:", "if sim.t % every == 0:", REF, K("markov")),
    M(
        S + "engine.py",
        'seeds = [int(cfg["seed"]) + r for r in range(R)]',
        'seeds = [int(cfg["seed"]) for r in range(R)]',
        REF,
        K("reset"),
    ),
    M(S + "engine.py", '"d": 1, "decode": "rescale"}', '"d": 1, "decode": "unbiased"}', REF, K("ef_sgd or ignore")),
    M(
        S + "engine.py",
        "self.sim_time += exp.straggler.last_time + self.upload_s",
        "self.sim_time += exp.straggler.last_time",
        REF,
        ENG,
        K("delay"),
    ),
]
CODES = [
    M(S + "codes.py", "1.0 / (c[r, j] * (1.0 - p)[r, i])", "1.0 / c[r, j]", REF, K("coco_ef-topk")),
    M(S + "codes.py", "c = S.sum(1, dtype=torch.float64)", "c = S.sum(2, dtype=torch.float64)", COD, REF),
    M(
        S + "codes.py",
        "zf * code.M / n.clamp_min(1.0)",
        "zf * code.M / (n.clamp_min(1.0) + 1)",
        REF,
        K("ef_sgd or ignore"),
    ),
    M(
        S + "codes.py",
        "z.to(torch.float64) / (1.0 - code.p)",
        "z.to(torch.float64) * (1.0 - code.p)",
        REF,
        K("unbiased"),
    ),
    M(S + "codes.py", "alive = zg.any(-1)", "alive = zg.all(-1)", REF, K("frc")),
    M(S + "codes.py", "a = a + P @ (ones - BmT @ a)", "a = a - P @ (ones - BmT @ a)", COD),
    M(S + "codes.py", "S.scatter_(1, (i + o) % N, True)", "S.scatter_(1, (i - o) % N, True)", REF, K("coco_ef-topk")),
    M(S + "codes.py", "H[:, :, -1] = -H[:, :, :-1].sum(-1)", "H[:, :, -1] = H[:, :, :-1].sum(-1)", COD),
    M(S + "codes.py", "B[..., i, i] = 1.0", "B[..., i, i] = 2.0", COD),
    # G by parts (CodedSum.kernel_parts, Code.row_parts): the renumbered columns, the runs, each part's CSR
    M(
        S + "codes.py",
        "np.searchsorted(used, cols).astype(np.int64)",
        "(cols - cols.min()).astype(np.int64)",
        CMP,
        K("by_parts"),
    ),
    M(S + "codes.py", "runs = [(int(r[0]), int(r[-1]) + 1)", "runs = [(int(r[0]), int(r[-1]))", CMP, K("by_parts")),
    M(S + "codes.py", "crow_np[p.i0 : p.i1 + 1] - lo", "crow_np[p.i0 : p.i1 + 1]", CMP, K("by_parts")),
    M(S + "codes.py", "at += j1 - j0", "at += 0", CMP, K("by_parts")),
    # the timed choice of G's form (FasterForm): the order of the trials, the form kept
    M(
        S + "codes.py",
        "return len(self.seconds[True]) <= len(self.seconds[False])",
        "return len(self.seconds[True]) < len(self.seconds[False])",
        CMP,
        K("form"),
    ),
    M(
        S + "codes.py",
        'G_FORM == "faster" and src.holds_whole() else None',
        'G_FORM == "faster" else None',
        CMP,
        K("form"),
    ),
    M(
        S + "codes.py",
        "min(self.seconds[True][1:]) <= min(self.seconds[False][1:])",
        "min(self.seconds[True]) <= min(self.seconds[False])",
        CMP,
        K("form"),
    ),
    M(
        S + "codes.py",
        "rng.rand(M, N, dtype=torch.float64) < d / N",
        "rng.rand(M, N, dtype=torch.float64) < 1 / N",
        COD,
    ),
    M(S + "codes.py", "vals = vals * z.reshape(-1).to(vals.dtype)[row]", "vals = vals", REF, K("freeze")),
    M(S + "codes.py", "    return a[..., 0] * zf\n", "    return a[..., 0]\n", COD),
]
COMPRESSORS = [
    M(
        S + "compressors.py",
        "by_position = torch.arange(L, 0, -1,",
        "by_position = torch.arange(1, L + 1,",
        CMP,
        K("tie"),
    ),
    M(
        S + "compressors.py",
        "scale = v.abs().sum(dim=-1, keepdim=True) / self.D",
        "scale = v.abs().sum(dim=-1, keepdim=True) / (self.D - 1)",
        REF,
        K("scaled_sign"),
    ),
    M(S + "compressors.py", "lengths[-1] = D - (B - 1) * g", "lengths[-1] = g", REF, K("grouped")),
    M(
        S + "compressors.py",
        "return torch.where(v < 0, -one, one)",
        "return torch.where(v <= 0, -one, one)",
        CMP,
        K("sign"),
    ),
    M(
        S + "compressors.py",
        "xi = low + (u < (y - low)).to(v.dtype)",
        "xi = low + (u > (y - low)).to(v.dtype)",
        OPT,
        K("qsgd"),
    ),
    M(
        S + "compressors.py",
        "return min(D / s**2, math.sqrt(D) / s)",
        "return max(D / s**2, math.sqrt(D) / s)",
        OPT,
        K("diana"),
    ),
    M(S + "compressors.py", "return self.D / self.k - 1.0", "return self.D / self.k", OPT, K("diana")),
    M(
        S + "compressors.py",
        "    def _scale(self) -> float:\n        return self.D / self.k",
        "    def _scale(self) -> float:\n        return self.D / (self.k + 1)",
        OPT,
        K("randk_unbiased"),
    ),
    M(
        S + "compressors.py",
        "p_up = 0.5 * (1.0 + v / safe)",
        "p_up = 0.5 * (1.0 - v / safe)",
        CMP,
        K("unbiased or value_sets"),
    ),
    M(S + "compressors.py", "keep = u < v.abs() / safe", "keep = u > v.abs() / safe", CMP, K("unbiased or value_sets")),
    M(
        S + "compressors.py",
        "mag = torch.where(u < p_up, 2.0 * low, low)",
        "mag = torch.where(u > p_up, 2.0 * low, low)",
        CMP,
        K("unbiased or value_sets"),
    ),
    M(S + "compressors.py", "return k * (vb + ceil_log2(D))", "return k * (vb + ceil_log2(D - 1))", CMP, K("bits")),
    M(S + "compressors.py", "return (n - 1).bit_length()", "return n.bit_length()", CMP, K("bits")),
    M(S + "compressors.py", "math.ceil(round(ratio * D, 9))", "math.ceil(ratio * D)", CMP, K("ratio")),
    M(
        S + "compressors.py",
        "return self.D + self.value_bits * self.n_blocks",
        "return self.value_bits * self.n_blocks",
        REF,
        K("grouped"),
    ),
    M(
        S + "compressors.py",
        "return self.D * (1 + ceil_log2(self.levels + 1)) + self.value_bits",
        "return self.D * (1 + ceil_log2(self.levels)) + self.value_bits",
        CMP,
        K("bits"),
    ),
    M(
        S + "compressors.py",
        "r = int(k / h + 3.0 * math.sqrt(k / h)) + 2",
        "r = int(k / h)",
        CMP,
        REF,
        K("topk or kernel"),
        equivalent="r only sets the sampled threshold t; rows whose candidates {|v_j| ≥ t} are fewer than k "
        "(now more of them) are selected over the full row, so the result stays exact: only speed changes",
    ),
]
KERNELS = [
    M(
        S + "topk_rows.c",
        "acc[q] += c * src[q];",
        "acc[q] = c * src[q];",
        CMP,
        K("fused"),
    ),
    M(
        S + "topk_rows.c",
        "o += (vals[j] > kth) | (vals[j] != vals[j]);",
        "o += (vals[j] >= kth) | (vals[j] != vals[j]);",
        CMP,
        K("topk"),
    ),
    M(
        S + "topk_rows.c",
        "if (k <= count && count <= cap) {",
        "if (k < count && count <= cap) {",
        CMP,
        K("topk"),
        equivalent="a row with exactly k candidates falls back to the full-row selection, which is exact too",
    ),
    M(
        S + "topk_rows.c",
        "dst[q] += c0 * s0[q] + c1 * s1[q] + c2 * s2[q];",
        "dst[q] += c0 * s0[q] + (c1 * s1[q] + c2 * s2[q]);",
        CMP,
        K("fused"),
    ),
    # the AVX-512 form is compiled only where the CPU has AVX-512 (elsewhere this one survives)
    M(
        S + "topk_rows.c",
        "_mm512_abs_ps(_mm512_loadu_ps(p + 16 * q)), tt, _CMP_NLT_UQ)",
        "_mm512_abs_ps(_mm512_loadu_ps(p + 16 * q)), tt, _CMP_GE_OQ)",
        "tests/test_kernels.py",
        K("vector_form"),
    ),
    M(
        S + "topk_rows.c",
        "for (int64_t o = 0; o < k; o++) row[o_i[o]] += -picked[i * k + o];",
        "for (int64_t o = 0; o < k; o++) row[o_i[o]] = 0;",
        CMP,
        K("subtract or fused"),
    ),
]
KERNELS += [
    M(
        S + "topk_rows.c",
        "for (int64_t q = 0; q < F; q++) d[q] += l[k * F + q];",
        "for (int64_t q = 0; q < F; q++) d[q] = l[k * F + q];",
        CMP,
        K("g_s_rows"),
    ),  # a bias sum that keeps its last term: not torch's sum
    M(
        S + "topk_rows.c",
        "#define G_AT(nz) (tm ? grow[(nz) - lo] + off + c : g + gstart[b] + col[nz] * w + c)",
        "#define G_AT(nz) (tm ? grow[(nz) - lo] + c : g + gstart[b] + col[nz] * w + c)",
        CMP,
        K("g_s_rows"),
    ),  # every block of a ring row read from its start
    M(
        S + "topk_rows.c",
        "a[v] = P##_fmadd_ps(p, xv, zero);",
        "a[v] = P##_mul_ps(p, xv);",
        CMP,
        K("g_s_rows"),
    ),  # products started without torch's +0: an exact zero product keeps -0
    M(
        S + "topk_rows.c",
        "while (user[turn] == i) turn = (turn + 1) % slots;",
        "(void)0;",
        CMP,
        K("g_s_rows"),
    ),  # the ring evicts a slot the current row still holds
    M(
        S + "topk_rows.c",
        "P##_storeu_ps(o2 + f0 + (W) * v, b[v]);",
        "P##_storeu_ps(o2 + f0 + (W) * v, a[v]);",
        CMP,
        K("g_s_rows"),
    ),  # the second row of products stored from the first
    M(
        S + "codes.py",
        "if not np.array_equal(o.numpy().view(ints), np.ascontiguousarray(rows[:, a:b]).view(ints)):",
        "if False:",
        CMP,
        K("forms_g_s_rows_only"),
    ),  # the check that never fails
    M(
        S + "codes.py",
        "self.in_kernel = terms is not None and (choice is None or choice.next())",
        "self.in_kernel = terms is not None",
        CMP,
        K("many_samples"),
    ),  # the timed choice never tries torch's stored G
    M(
        S + "codes.py",
        'timed = terms is not None and G_FORM == "faster" and terms.B > FUSED_MAX_SAMPLES',
        'timed = terms is not None and G_FORM == "faster" and terms.B >= FUSED_MAX_SAMPLES',
        CMP,
        K("many_samples"),
    ),  # FUSED_MAX_SAMPLES samples timed too
]
STRAGGLERS = [
    M(
        S + "stragglers.py",
        "return self.rng.rand(self.M, dtype=F64) >= self.p",
        "return self.rng.rand(self.M, dtype=F64) >= 1.0 - self.p",
        STR,
    ),
    M(
        S + "stragglers.py",
        "return self.rng.randperm(self.M).to(self.p.device) >= self.s",
        "return self.rng.randperm(self.M).to(self.p.device) > self.s",
        STR,
    ),
    M(S + "stragglers.py", "q = p * (1.0 - stay) / (1.0 - p)", "q = p * (1.0 - stay)", STR),
    M(
        S + "stragglers.py",
        "torch.where(self.state, u < self.stay, u < self.q)",
        "torch.where(self.state, u < self.q, u < self.stay)",
        STR,
    ),
    M(S + "stragglers.py", "self.state = u < self.p", "self.state = u < self.q", STR),
    M(
        S + "stragglers.py",
        "T = self.loads * (self.t0 - torch.log1p(-u) / self.mu)",
        "T = self.loads * (self.t0 - torch.log1p(-u) * self.mu)",
        STR,
        REF,
        K("delay"),
    ),
    M(
        S + "stragglers.py",
        "torch.exp(-mu * slack.clamp_min(0.0))",
        "torch.exp(-slack.clamp_min(0.0) / mu)",
        STR,
        REF,
        K("delay"),
    ),
    M(S + "stragglers.py", "T.max(-1).values)", "T.min(-1).values)", STR, REF, ENG, K("delay")),
    M(S + "stragglers.py", "p = torch.linspace(lo, hi, M, dtype=F64", "p = torch.linspace(hi, lo, M, dtype=F64", STR),
    M("cocoef_cli/rng.py", "STREAMS.index(stream)]", "0]", STR, ENG),
]
C = "cocoef_cli/models.py"
MODELS = [
    M(
        C,
        "W = vb.to(self.Xp.dtype) * self.sizes.unsqueeze(-1) / (bj * self.n)",
        "W = vb.to(self.Xp.dtype) / self.n",
        OPT,
        K("minibatch"),
    ),
    M(C, "bj = self.sizes.clamp(max=b).clamp(min=1)", "bj = self.sizes.clamp(min=1)", OPT, K("minibatch")),
    M(
        C,
        "block[a - first : b - first].add_(scale * th)",
        "block[a - first : b - first].add_(self.l2 * th)",
        REF,
        K("ridge"),
    ),
    M(
        C,
        "F = self.model.losses(Z, self.Y).mean(-1)\n        return F + 0.5 * self.l2 * (theta * theta).sum(-1) if self.l2 else F",
        "F = self.model.losses(Z, self.Y).mean(-1)\n        return F + self.l2 * (theta * theta).sum(-1) if self.l2 else F",
        MOD,
        NOCNN,
    ),
    M(
        C,
        "F, g = F + 0.5 * self.l2 * (theta * theta).sum(-1), g + self.l2 * theta",
        "F, g = F + self.l2 * (theta * theta).sum(-1), g + self.l2 * theta",
        REF,
        K("ridge or classification"),
    ),
    M(
        C,
        "return g + self.l2 * theta if self.l2 else g",
        "return g + 0.5 * self.l2 * theta if self.l2 else g",
        MOD,
        NOCNN,
    ),
    M(
        C,
        "return torch.sigmoid(Z) - Y.unsqueeze(-1).to(Z.dtype)",
        "return Y.unsqueeze(-1).to(Z.dtype) - torch.sigmoid(Z)",
        REF,
        K("classification"),
    ),
    M(
        C,
        "return Fn.softplus(z) - Y.to(z.dtype) * z",
        "return Fn.softplus(-z) - Y.to(z.dtype) * z",
        REF,
        K("classification"),
    ),
    M(
        C,
        "return ((Z.squeeze(-1) > 0).long() == Y).to(Z.dtype)",
        "return ((Z.squeeze(-1) < 0).long() == Y).to(Z.dtype)",
        REF,
        K("classification"),
    ),
    M("cocoef_cli/nets.py", "P = torch.softmax(Zt, 1)", "P = torch.softmax(Zt, 2)", REF, K("classification")),
    M(C, "P = torch.softmax(Z, -1)", "P = torch.softmax(Z, 0)", REF, K("classification")),
    M(C, "return 0.5 * (Z.squeeze(-1) - Y) ** 2", "return (Z.squeeze(-1) - Y) ** 2", REF, K("coco_ef-topk")),
    M(
        C,
        "E = self.residual(Z, Y) / Xf.shape[0]",
        "E = self.residual(Z, Y) / (Xf.shape[0] - 1)",
        REF,
        K("coco_ef-topk"),
    ),
    M(
        C,
        "torch.cat([X, torch.ones(*X.shape[:-1], 1,",
        "torch.cat([X, torch.zeros(*X.shape[:-1], 1,",
        REF,
        K("coco_ef-topk"),
    ),
    M(
        C,
        "self.Wp = valid.to(dtype) / self.n",
        "self.Wp = valid.to(dtype) / valid.sum(-1, keepdim=True)",
        REF,
        K("coco_ef-topk"),
    ),
    M(
        C,
        "W = theta.view(-1, self.C, self.f)",
        "W = theta.view(-1, self.f, self.C).transpose(1, 2)",
        REF,
        K("classification"),
    ),
    M(C, "A = X.T @ X / n + self.l2 * np.eye(f)", "A = X.T @ X / n", REF, K("ridge")),
    M(
        C,
        "return self.init_scale * rng.randn(self.D, dtype=dtype)",
        "return rng.randn(self.D, dtype=dtype)",
        REF,
        K("init"),
    ),
    M(C, "return (Z.argmax(-1) == Y).to(Z.dtype)", "return (Z.argmin(-1) == Y).to(Z.dtype)", REF, K("classification")),
    # a plugin's override of weighted_grads is not bypassed by the forms it inherits
    M(
        C,
        "if mine is None or grads is None or not issubclass(mine, grads):",
        "if mine is None:",
        MOD,
        K("overriding_only"),
    ),
]
N = "cocoef_cli/nets.py"
NETS = [
    # a range of G's rows shorter than the threads is formed within a wider one (same bits as G whole)
    M(N, "wide = min(self.rows, max(2, torch.get_num_threads()))", "wide = 1", MOD, K("every_single_row")),
    M(N, '"tanh": lambda a: 1 - a * a', '"tanh": lambda a: 1 - a', MOD, NOCNN),
    M(N, '"sigmoid": lambda a: a * (1 - a)', '"sigmoid": lambda a: 1 - a', MOD, NOCNN),
    M(N, '"relu": lambda a: torch.gt(a, 0,', '"relu": lambda a: torch.ge(a, 0,', MOD, NOCNN),
    M(N, "c = 1.0 / math.sqrt(fan_in)", "c = 1.0 / fan_in", MOD, NOCNN),
    M(N, "c = math.sqrt(6.0 / fan_in)", "c = math.sqrt(2.0 / fan_in)", MOD, NOCNN),
    M(N, "c = math.sqrt(6.0 / (fan_in + fan_out))", "c = math.sqrt(6.0 / fan_in)", MOD, NOCNN),
    M(
        N,
        "return (2 * rng.rand(self.D, dtype=dtype) - 1) * torch.cat(bounds)",
        "return rng.rand(self.D, dtype=dtype) * torch.cat(bounds)",
        RMD,
        MOD,
        NOCNN,
    ),
    M(N, "delta = torch.bmm(delta, P[2 * l]) * self.dact(A)", "delta = torch.bmm(delta, P[2 * l])", MOD, NOCNN),
    M(N, "for l in range(len(self.sizes) - 2, -1, -1):", "for l in range(len(self.sizes) - 2, 0, -1):", MOD, NOCNN),
    M(N, "A = self.act(Z) if l < L - 1 else Z", "A = self.act(Z)", MOD, NOCNN),
    M(N, "torch.bmm(L[first:stop], X[first:stop]", "torch.bmm(L[first:stop], X[: stop - first]", MOD, K("by_rows")),
    M(
        C,
        "for r in range(first // N, (stop - 1) // N + 1):",
        "for r in range(first // N, (stop - 1) // N):",
        MOD,
        K("by_rows"),
    ),
    M(
        C,
        "theta[r].split(list(self.model.blocks), -1)",
        "theta[0].split(list(self.model.blocks), -1)",
        MOD,
        K("autograd_per_partition"),
    ),
    M(N, "w = torch.full((Xf.shape[0],), 1.0 / Xf.shape[0],", "w = torch.full((Xf.shape[0],), 1.0,", MOD, NOCNN),
    M(
        N,
        '"""Per-sample ℓ = logsumexp(z) − z_y."""\n        return torch.logsumexp(Z, -1) - Z.gather(',
        '"""Per-sample ℓ = logsumexp(z) − z_y."""\n        return torch.logsumexp(Z, -1) + Z.gather(',
        RMD,
        MOD,
        NOCNN,
    ),
    M(
        N,
        "return (Z.argmax(-1) == Y).to(Z.dtype)",
        "return (Z.argmin(-1) == Y).to(Z.dtype)",
        RMD,
        MOD,
        K("cnn and not mnist5k or mlp_run"),
    ),
    M(
        N,
        "                if l < nfc - 1:\n                    a = self.act(a)",
        "                if l < nfc:\n                    a = self.act(a)",
        MOD,
        K("cnn and not mnist5k"),
    ),
    M(N, "w = torch.full((n,), 1.0 / n,", "w = torch.full((n,), 1.0,", MOD, K("cnn and not mnist5k")),
]
RP, REP = "cocoef_cli/report.py", "tests/test_report.py"
CURVES = K("grid or curves or diverged or iters or several_folders")
REPORT: list[Mutation] = [
    M(
        RP, 'ok = runs[runs["status"] == "completed"].copy()', "ok = runs.copy()", REP, CURVES
    ),  # diverged/failed averaged in
    M(RP, "* std / n.pow(0.5)", "* std", REP, CURVES),  # band not shrinking with the seeds
    M(RP, "t.ppf(0.975, (n - 1).clip(lower=1))", "t.ppf(0.975, n)", REP, CURVES),  # wrong degrees of freedom
    M(RP, "t.ppf(0.975,", "t.ppf(0.95,", REP, CURVES),  # a 90% interval
    M(RP, 'g = d.groupby(["curve_id", "iter"], sort=True)', 'g = d.groupby(["run", "iter"], sort=True)', REP, CURVES),
    M(RP, 'x=(x, "mean")', 'x=(x, "max")', REP, CURVES),  # x of a curve: the seeds' mean bits
    M(
        RP,
        'data.groupby(["curve_id", "seed"])["iter"].transform("max")',
        'data.groupby(["curve_id", "seed"])["iter"].transform("min")',
        REP,
        CURVES,
    ),
    M(
        RP, "runs[k].map(_value).nunique() > 1]", "runs[k].map(_value).nunique() > 2]", REP, CURVES
    ),  # a 2-valued key averaged
    M(
        RP,
        'NOT_CONFIG = ("seed", "seeds", "checkpoint_every")',
        'NOT_CONFIG = ("seeds", "checkpoint_every")',
        REP,
        CURVES,
    ),
    M(
        RP, 'table["seeds"] = g["seed"].nunique()', 'table["seeds"] = g["run"].nunique()', REP, CURVES
    ),  # runs counted as seeds
]

MUTATIONS: list[Mutation] = METHODS + ENGINE + CODES + COMPRESSORS + KERNELS + STRAGGLERS + MODELS + NETS + REPORT
