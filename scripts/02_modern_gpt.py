# ---
# jupyter:
#   jupytext:
#     formats: notebooks///ipynb,scripts///py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Capítulo 02 — A arquitetura moderna, um interruptor de cada vez
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/02_modern_gpt.ipynb)
#
# No capítulo 01 treinamos o GPT-2 do nanoGPT. Entre o GPT-2 (2019) e um Mistral 7B (2023), um
# Llama 3 ou um Gemma 2 (2024) a receita mudou pouco, mas mudou em lugares precisos. Neste
# capítulo cada mudança é **um campo** de `GPTConfig` — um "interruptor" — e o modelo do capítulo 01 é
# exatamente a configuração com todos desligados:
#
# | interruptor | GPT-2 (capítulo 01) | moderno | artigo |
# |---|---|---|---|
# | `pos_emb` | `"learned"` (tabela de posições) | `"rope"` | [Su et al. 2021 (RoFormer)][rope] |
# | `norm` | `"layernorm"` | `"rmsnorm"` | [Zhang & Sennrich 2019][rms] |
# | `mlp` | `"gelu"` (4× C) | `"swiglu"` (≈ 8/3 × C) | [Shazeer 2020][glu] |
# | `n_kv_head` | `None` (= `n_head`: MHA) | divisor de `n_head` (GQA); 1 (MQA) | [GQA 2023][gqa]; [MQA 2019][mqa] |
# | `attn` | `"sdpa"` ou `"manual"` | `"sdpa"` (FlashAttention nas GPUs que o suportam) | [Dao et al. 2022][flash] |
# | `bias` | `True` | `False` | [PaLM (Chowdhery et al. 2022)][palm] |
# | `logit_softcap` | `None` | `None` ou p.ex. 30,0 | [Gemma 2 (2024)][gemma2] |
#
# [rope]: https://arxiv.org/abs/2104.09864
# [rms]: https://arxiv.org/abs/1910.07467
# [glu]: https://arxiv.org/abs/2002.05202
# [gqa]: https://arxiv.org/abs/2305.13245
# [mqa]: https://arxiv.org/abs/1911.02150
# [flash]: https://arxiv.org/abs/2205.14135
# [palm]: https://arxiv.org/abs/2204.02311
# [gemma2]: https://arxiv.org/abs/2408.00118
#
# Para cada interruptor: a ideia, a equação, o código do pacote (`inspect.getsource`) e uma
# verificação numérica. Depois, um **experimento de ablação** no corpus de Machado de Assis:
# partimos do GPT-2 e ligamos os interruptores um a um, com a mesma semente e o mesmo número de
# tokens. Por fim, o **KV cache**: por que a geração fica rápida e quanto de memória GQA/MQA
# economizam.
#
# Cada verificação numérica deste notebook tem um teste em `tests/test_02_layers.py` e
# `tests/test_02_cache.py` (rode `uv run pytest tests/test_02_*.py`), inclusive a comparação
# do nosso RoPE com o do `transformers` (Hugging Face Llama).

# %%
# Set-up: on Colab (or any Jupyter without nanomoe) install the release this notebook was written for.
import importlib.util
import subprocess
import sys

NANOMOE_REF = "v0.3.1"
if importlib.util.find_spec("nanomoe") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"nanomoe @ git+https://github.com/sagui-nlp/nanomoe@{NANOMOE_REF}"], check=True)
    importlib.invalidate_caches()

from nanomoe.course.notebook import setup

device = setup("02", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %%
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from nanomoe import GPT, GPTConfig, KVCache, get_tokenizer, gpt2_config, modern_config
from nanomoe.attention import CausalSelfAttention, manual_attention
from nanomoe.course.diagrams import plot_gqa_heads, plot_lr_schedule, plot_rope_rotation
from nanomoe.course.notebook import show_source
from nanomoe.course.plots import plot_curves, save_figure
from nanomoe.data import encode_splits, read_corpus
from nanomoe.device import pick_precision
from nanomoe.mlp import MLP
from nanomoe.norm import RMSNorm
from nanomoe.rope import apply_rope, rope_tables, rotate_half
from nanomoe.training.cli import parse_args
from nanomoe.training.train import TrainConfig, train

# %% [markdown]
# ## Parâmetros
#
# Os valores abaixo são os da execução de referência (seção 10): 7 treinos de 300 passos, cerca de
# 12 min de relógio para o notebook inteiro numa CPU de 2 núcleos compartilhada (threads padrão do
# PyTorch); numa GPU, não medido ainda. Rode como script com `uv run -m scripts.02_modern_gpt`;
# para treinos mais longos, `--steps=600`. Num notebook, edite o dicionário ou defina
# `NANOMOE_ARGS="--steps=600"`. `--quick` roda tudo em segundos (é o que os testes usam).

# %%
DEFAULTS = dict(
    quick=False,
    corpus="machado",
    source="",  # a local copy of the corpus (a folder of .txt files) when offline
    tokenizer="char",
    n_layer=4,
    n_head=4,
    n_embd=128,
    n_kv_head=2,  # the "+gqa" step: 2 key/value heads shared by 4 query heads
    block_size=128,
    batch_size=16,
    steps=300,  # optimizer steps per configuration (same token budget for every one)
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=30,
    eval_interval=25,
    eval_iters=10,
    speed_rounds=6,  # rounds of the side-by-side tokens/s measurement
    softcap=30.0,  # the last ablation step (Gemma 2's value); 0 = skip it
    seed=1337,
    device="auto",
    kv_block_size=1024,  # KV-cache section: a model with a long context
    kv_tokens=512,  # tokens generated for the time-per-token plot
    out_dir="runs/02",
    threads=0,  # torch CPU threads; 0 = torch's default (all cores)
)
QUICK = dict(n_layer=1, n_head=4, n_embd=32, n_kv_head=2, block_size=32, batch_size=4, steps=4, warmup_steps=2,
             eval_interval=2, eval_iters=2, kv_block_size=64, kv_tokens=24, threads=1,
             speed_rounds=2)
args = parse_args(DEFAULTS, quick=QUICK)
out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
if args.threads > 0:
    torch.set_num_threads(args.threads)  # tiny tensors (--quick) run faster on one thread
torch.manual_seed(args.seed)
print(args)

# %% [markdown]
# ## O ponto de partida
#
# Todos os interruptores moram em `GPTConfig`. O valor padrão de cada um é o comportamento do
# capítulo 01, então `gpt2_config()` e `GPTConfig()` são o mesmo modelo; `modern_config()` liga
# tudo de uma vez. O modelo lê a configuração **uma vez**, no construtor, e monta as peças certas:
# não há `if config.x` espalhado pelo laço de treino.

# %%
small = dict(vocab_size=128, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
for name, cfg in [("gpt2", gpt2_config(**small)), ("modern", modern_config(**small))]:
    m = GPT(cfg)
    print(f"{name:7s} pos_emb={cfg.pos_emb:8s} norm={cfg.norm:10s} mlp={cfg.mlp:7s} n_head={cfg.n_head} "
          f"kv_heads={cfg.kv_heads} attn={cfg.attn} bias={cfg.bias} softcap={cfg.logit_softcap} "
          f"-> {m.num_params(non_embedding=False):,} parâmetros")

# %% [markdown]
# ## 1. RoPE — posições por rotação (Su et al. 2021)
#
# O GPT-2 soma ao embedding de cada token um vetor aprendido da sua posição absoluta
# (`wpe`, uma tabela `block_size × C`). O RoPE não soma nada: ele **gira** q e k dentro da
# atenção. Cada par de dimensões $(x_i, x_{i+d/2})$ de um vetor na posição $m$ é rodado pelo
# ângulo $m\,\theta_i$, com $\theta_i = \text{base}^{-2i/d}$ (base = `rope_theta` = 10000):
#
# $$
# \begin{pmatrix} x'_i \\ x'_{i+d/2} \end{pmatrix} =
# \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
# \begin{pmatrix} x_i \\ x_{i+d/2} \end{pmatrix}
# \quad\Longleftrightarrow\quad x' = x \odot \cos(m\theta) + \text{rotate\_half}(x) \odot \sin(m\theta).
# $$
#
# Como $R_m^\top R_n = R_{n-m}$, o produto $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$
# depende só da **distância** $n - m$: a atenção enxerga posições relativas, e não há tabela de
# posições para aprender (nem limite rígido de tamanho da tabela).
#
# **Convenção.** O artigo original pareia dimensões vizinhas $(x_{2i}, x_{2i+1})$ ("interleaved").
# O Llama do Hugging Face pareia $x_i$ com $x_{i+d/2}$ ("rotate-half"). As duas são equivalentes a
# menos de uma permutação das linhas de $W_q$ e $W_k$ — e é exatamente essa permutação que quebra
# a conversão de pesos quando alguém mistura as duas. Usamos rotate-half, então pesos do Llama
# carregam sem permutar nada (teste `test_rope_matches_hf_llama`).

# %%
show_source(rope_tables, rotate_half, apply_rope)

# %% [markdown]
# Em figura: o mesmo vetor de 16 dimensões nas posições 0 a 7. Cada painel é um par de
# dimensões $(x_i, x_{i+8})$ visto como um ponto do plano; na posição $m$ ele está girado de
# $m\,\theta_i$. O primeiro par gira 1 radiano por posição; o último, 0,0003: é ele que ainda
# distingue posições a milhares de tokens de distância.

# %%
fig = plot_rope_rotation(head_dim=16, positions=range(8), pairs=(0, 2, 7), save_path=out_dir / "rope_rotation.png")

# %% [markdown]
# **Construa você mesmo.** O RoPE em sete linhas, direto da equação: uma frequência $\theta_i$ por
# par, o ângulo $m\,\theta_i$ por posição e a rotação 2-D de cada par. Digite, rode, e a célula
# seguinte confere que dá o mesmo que `apply_rope` do pacote.

# %%
def my_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x (T, D): the vector at each position m = 0..T-1, rotated pair by pair."""
    T, D = x.shape
    theta = base ** (-torch.arange(0, D, 2).float() / D)  # (D/2,) one frequency per pair
    angle = torch.arange(T).float()[:, None] * theta[None, :]  # (T, D/2): m * theta_i
    x1, x2 = x[:, : D // 2], x[:, D // 2 :]  # pair i is (x_i, x_{i+D/2}): rotate-half
    cos, sin = angle.cos(), angle.sin()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # rotate each pair


# %%
x_rope = torch.randn(10, 16)
torch.testing.assert_close(my_rope(x_rope), apply_rope(x_rope, *rope_tables(16, 10)))
torch.testing.assert_close(my_rope(x_rope, base=500.0), apply_rope(x_rope, *rope_tables(16, 10, theta=500.0)))
print("my_rope == nanomoe.rope.apply_rope (base 10000 e 500)")

# %% [markdown]
# Verificação da propriedade relativa: o produto escalar depois da rotação nas posições
# $(m, n)$ e $(m+s, n+s)$ é o mesmo, para qualquer deslocamento $s$.

# %%
D = 16
cos, sin = rope_tables(D, 512)
q, k = torch.randn(D), torch.randn(D)


def rope_score(m: int, n: int) -> float:
    return float(apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n]))


for s in (0, 10, 100, 400):
    print(f"s={s:3d}:  q_(5+s) . k_(2+s) = {rope_score(5 + s, 2 + s):+.5f}    "
          f"q_(5+s) . k_(9+s) = {rope_score(5 + s, 9 + s):+.5f}")

# %% [markdown]
# E o score em função da distância: frequências altas (primeiras dimensões) giram rápido e
# codificam posição fina; as baixas giram devagar e alcançam longe. Com q = k o score tende a cair
# com a distância (o "decaimento de longo alcance" do artigo, seção 3.4.3).

# %%
qk = torch.ones(64)
cos64, sin64 = rope_tables(64, 1024)
dist = np.arange(0, 1000)
scores = [float(apply_rope(qk, cos64[0], sin64[0]) @ apply_rope(qk, cos64[d], sin64[d])) for d in dist]
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(dist, scores)
ax.set_xlabel("distância n - m")
ax.set_ylabel("q · k após o RoPE")
ax.set_title("RoPE: o score depende só da distância (q = k = 1, d = 64)")
ax.grid(alpha=0.3)
save_figure(fig, out_dir / "rope_decay.png")

# %% [markdown]
# ## 2. RMSNorm (Zhang & Sennrich 2019)
#
# O LayerNorm centraliza e reescala: $y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\, g + b$.
# O RMSNorm só reescala pela raiz da média dos quadrados:
#
# $$ y = \frac{x}{\sqrt{\tfrac{1}{C}\sum_j x_j^2 + \epsilon}} \odot g $$
#
# Uma redução em vez de duas, sem viés — e, empiricamente, a mesma qualidade. O Llama calcula
# a norma em float32 mesmo quando o modelo roda em bfloat16; fazemos igual.

# %%
show_source(RMSNorm)

# %% [markdown]
# **Construa você mesmo** (três linhas) e confira contra o `RMSNorm` do pacote e o `F.rms_norm` do
# PyTorch, com um ganho $g$ aleatório para que a conferência também cubra a multiplicação por ele:

# %%
def my_rmsnorm(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # root mean square over the C channels
    return x / rms * g


# %%
x = torch.randn(2, 5, 32) * 3 + 1
norm = RMSNorm(32, eps=1e-5).requires_grad_(False)
torch.nn.init.normal_(norm.weight)  # a gain that is not all ones
torch.testing.assert_close(my_rmsnorm(x, norm.weight), norm(x))
torch.testing.assert_close(F.rms_norm(x, (32,), norm.weight, 1e-5), norm(x))
print("my_rmsnorm == nanomoe.norm.RMSNorm == F.rms_norm")

# %% [markdown]
# ## 3. SwiGLU (Shazeer 2020)
#
# O MLP do GPT-2 é $W_2\,\text{GELU}(W_1 x)$ com largura $4C$. O SwiGLU multiplica duas
# projeções, uma delas passada por SiLU ($\text{silu}(z) = z\,\sigma(z)$), que funciona como uma
# "porta" aprendida:
#
# $$ \text{SwiGLU}(x) = W_2\,\big(\text{silu}(W_g x) \odot W_u x\big) $$
#
# São três matrizes em vez de duas; para manter os parâmetros, a largura vira $\tfrac{2}{3}\cdot 4C
# = \tfrac{8}{3}C$, arredondada para cima a um múltiplo de `mlp_multiple_of` (32 no curso). O Llama
# faz a mesma conta com `multiple_of` = 256: com C = 4096 a tabela abaixo dá 10 944 (múltiplo de 32),
# e o Llama-7B usa 11 008 (o múltiplo de 256 seguinte).
# Guardamos $W_g$ e $W_u$ juntos numa só matriz `c_fc` (linhas `[gate; up]`): uma multiplicação
# em vez de duas.

# %%
show_source(MLP)

# %% [markdown]
# **Construa você mesmo:** o SwiGLU é uma linha. O pacote guarda $W_g$ e $W_u$ empilhados em
# `c_fc` (linhas `[gate; up]`); `chunk` os separa.

# %%
def my_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x (..., C); w_gate, w_up (H, C); w_down (C, H), the nn.Linear layout."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


# %%
mlp = MLP(32, 88, "swiglu", bias=False).requires_grad_(False)
w_gate, w_up = mlp.c_fc.weight.chunk(2, dim=0)
torch.testing.assert_close(my_swiglu(x, w_gate, w_up, mlp.c_proj.weight), mlp(x))
print("my_swiglu == nanomoe.mlp.MLP(kind='swiglu')")

# %%
for C in (128, 768, 4096):
    cfg = GPTConfig(n_embd=C, n_head=4, mlp="swiglu")
    H = cfg.hidden_dim
    gelu_p, swiglu_p = 2 * C * 4 * C, 3 * C * H
    print(f"C={C:5d}: GELU 4C = {4 * C:6d} ({gelu_p:>11,} pesos) | "
          f"SwiGLU 8C/3 -> {H:6d} ({swiglu_p:>11,} pesos, {swiglu_p / gelu_p:.3f}x)")

# %% [markdown]
# ## 4. GQA e MQA: menos cabeças de chave/valor (Ainslie et al. 2023; Shazeer 2019)
#
# Na atenção multi-cabeça (MHA) cada uma das $H$ cabeças de consulta tem sua chave e seu valor.
# Na **multi-query** (MQA) todas compartilham **uma** cabeça de k/v; na **grouped-query** (GQA)
# há `n_kv_head` cabeças de k/v, cada uma servindo um grupo de `n_head // n_kv_head` consultas:
#
# $$ \text{head}_h = \text{softmax}\!\Big(\frac{q_h K_{g(h)}^\top}{\sqrt{d}} + M\Big) V_{g(h)},
# \qquad g(h) = \lfloor h / (H / H_{kv}) \rfloor $$
#
# **Atenção ao nome:** `n_kv_head` é um **número de cabeças** de k/v (1 = MQA, `n_head` = MHA),
# não o tamanho do grupo — confundir os dois é um erro comum. Ele precisa dividir `n_head`, senão
# `GPTConfig` recusa com uma mensagem clara. O ganho principal aparece na geração: o KV cache
# guarda só as `n_kv_head` cabeças (seção 9).

# %%
show_source(CausalSelfAttention.forward)

# %% [markdown]
# Em figura: 8 cabeças de consulta e as cabeças de chave/valor que elas leem. O KV cache guarda só a
# linha de baixo.

# %%
fig = plot_gqa_heads(((8, 8), (8, 2), (8, 1)), save_path=out_dir / "gqa_heads.png")

# %% [markdown]
# **Construa você mesmo: atenção causal com GQA.** Dez linhas: repetir cada cabeça de k/v para o
# seu grupo, os scores $qk^\top/\sqrt{d}$, a máscara causal (a consulta $t$ só vê as chaves
# $0..t$) e o softmax. Para conferir, usamos as projeções do próprio `CausalSelfAttention` (4
# cabeças de consulta, 2 de k/v) e comparamos a saída do módulo inteiro.

# %%
def my_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with shared kv heads. q (H, T, D); k, v (Hkv, T, D) -> (H, T, D)."""
    H, T, D = q.shape
    k = k.repeat_interleave(H // k.size(0), dim=0)  # kv head j serves query heads j*H/Hkv .. (j+1)*H/Hkv - 1
    v = v.repeat_interleave(H // v.size(0), dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(D)  # (H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # query t sees keys 0..t
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


# %%
torch.manual_seed(0)
attn = CausalSelfAttention(GPTConfig(n_head=4, n_kv_head=2, n_embd=32, block_size=16, bias=False)).requires_grad_(False)
x_att = torch.randn(1, 12, 32)  # one sequence of 12 tokens
Hq, Hkv, Dh = 4, 2, 8
q_h, k_h, v_h = attn.c_attn(x_att[0]).split([Hq * Dh, Hkv * Dh, Hkv * Dh], dim=-1)  # the module's projections
q_h, k_h, v_h = (t.view(12, -1, Dh).transpose(0, 1) for t in (q_h, k_h, v_h))  # (heads, T, D)
y_mine = my_attention(q_h, k_h, v_h).transpose(0, 1).reshape(12, Hq * Dh)  # heads side by side again
torch.testing.assert_close(attn.c_proj(y_mine), attn(x_att)[0])
print("my_attention (causal, GQA 4:2) == nanomoe.attention.CausalSelfAttention")

# %%
try:
    GPTConfig(n_head=4, n_embd=32, n_kv_head=3)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 5. SDPA e FlashAttention (Dao et al. 2022)
#
# A atenção é $\text{softmax}(QK^\top/\sqrt{d} + M)\,V$ com a máscara causal $M$ ($-\infty$ acima
# da diagonal). Escrita à mão (`attn="manual"`), ela materializa a matriz $T \times T$ de scores.
# `F.scaled_dot_product_attention` (`attn="sdpa"`) calcula o mesmo resultado, mas escolhe o
# kernel: o FlashAttention percorre $K, V$ em blocos com um softmax "online" e nunca escreve a
# matriz $T\times T$ na memória — mesma conta, muito menos tráfego de memória. O kernel flash do
# PyTorch exige uma GPU Ampere ou mais nova (capacidade sm80+, fp16/bf16); numa T4 (sm75) o SDPA
# escolhe o kernel *memory-efficient* (Rabe & Staats 2021, que também não materializa a matriz), e
# na CPU um kernel próprio; com uma máscara explícita (o KV cache, seção 9) as opções diminuem. A
# versão manual fica para ensinar; os testes garantem que as duas concordam (MHA/GQA/MQA, com e
# sem cache).

# %%
show_source(manual_attention)

# %%
torch.manual_seed(0)
cfg_manual = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, pos_emb="rope",
                       attn="manual")
m_manual = GPT(cfg_manual).eval()
m_sdpa = GPT(cfg_manual.replace(attn="sdpa")).eval()
m_sdpa.load_state_dict(m_manual.state_dict())
idx = torch.randint(0, 64, (2, 32))
with torch.no_grad():
    print("max |sdpa - manual| nos logits =", float((m_sdpa(idx)[0] - m_manual(idx)[0]).abs().max()))

# %% [markdown]
# ## 6. Sem viés (PaLM, Chowdhery et al. 2022)
#
# O PaLM tirou os vieses de todas as camadas lineares e normas: "aumenta a estabilidade de
# treinos grandes". Em modelos pequenos o efeito é pequeno; o ganho é simplicidade (e menos
# parâmetros sem *weight decay*). `bias=False` remove **todos** os vieses — o teste
# `test_bias_false_removes_every_bias` confere módulo por módulo.

# %%
for bias in (True, False):
    m = GPT(gpt2_config(**small, bias=bias))
    n_bias = sum(p.numel() for n, p in m.named_parameters() if n.endswith("bias"))
    print(f"bias={bias!s:5s}: {n_bias:6,} parâmetros de viés de {m.num_params(non_embedding=False):,}")

# %% [markdown]
# ## 7. Soft-capping dos logits (Gemma 2, 2024)
#
# O Gemma 2 limita os logits finais com uma tangente hiperbólica:
#
# $$ \text{logits} \leftarrow c \cdot \tanh(\text{logits} / c), \qquad c = 30 $$
#
# Para $|z| \ll c$ é quase a identidade ($\tanh u \approx u$); para $|z|$ grande satura em $\pm c$,
# o que impede logits explosivos. O detalhe que importa: o cap tem de valer **igual** no treino,
# na avaliação e na geração — senão as losses de treino e validação não são comparáveis e o
# modelo gera com uma distribuição diferente da que aprendeu. Por isso ele mora num único lugar,
# `GPT.logits`, pelo qual passam `forward` e `generate`. (O Gemma 2 também limita os scores da
# atenção, com $c = 50$; aqui implementamos só o cap dos logits finais.)

# %%
show_source(GPT.logits)

# %%
z = torch.linspace(-100, 100, 401)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(z, z, "--", color="gray", label="sem cap")
ax.plot(z, 30 * torch.tanh(z / 30), label="30·tanh(z/30)")
ax.set_ylim(-60, 60)
ax.set_xlabel("logit z")
ax.legend()
ax.grid(alpha=0.3)
save_figure(fig, out_dir / "softcap.png")

# %% [markdown]
# ## 8. A ablação: ligando os interruptores um a um
#
# Corpus: as obras de Machado de Assis (domínio público), tokenizador de caracteres. 90% do
# texto para treino, os 10% finais para validação. Cada configuração parte da anterior e liga
# **um** interruptor; todas usam a mesma semente (mesma inicialização onde as formas coincidem,
# os mesmos lotes, na mesma ordem) e o mesmo número de tokens.

# %%
text = read_corpus(args.corpus, source=args.source or None)
if args.quick:
    text = text[:200_000]
tok = get_tokenizer(args.tokenizer, text=text)
train_ids, val_ids = encode_splits(tok, text)  # first 90% of the characters / last 10%
print(f"{len(text):,} caracteres, vocabulário de {tok.vocab_size} símbolos; "
      f"{len(train_ids):,} tokens de treino, {len(val_ids):,} de validação")

# %%
shape = dict(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
             n_embd=args.n_embd, dropout=0.0)
steps = [
    ("gpt2 (baseline)", {}),
    ("+rope", dict(pos_emb="rope")),
    ("+rmsnorm", dict(norm="rmsnorm")),
    ("+swiglu", dict(mlp="swiglu")),
    (f"+gqa (n_kv_head={args.n_kv_head})", dict(n_kv_head=args.n_kv_head)),
    ("+no-bias", dict(bias=False)),
]
if args.softcap > 0:
    steps.append((f"+softcap ({args.softcap:g})", dict(logit_softcap=args.softcap)))
configs, switches = {}, {}
for name, change in steps:
    switches.update(change)
    configs[name] = gpt2_config(**shape, **switches)
# the cumulative end point is the modern preset (with our n_kv_head): nothing hidden
assert configs[steps[5][0]] == modern_config(**shape, n_kv_head=args.n_kv_head)

tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                   warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                   weight_decay=0.1, grad_clip=1.0, seed=args.seed, device=args.device, sample_tokens=0)
print(f"{len(configs)} configurações x {tcfg.max_steps * tcfg.batch_size * args.block_size:,} tokens de treino cada")

# %% [markdown]
# ### O laço de treino: o que `nanomoe.training.train.train` faz a cada passo
#
# O capítulo 01 usou o laço mais simples possível. Daqui em diante todo treino passa por
# `nanomoe.training.train.train` (o mesmo do capítulo 04, de uma CPU a várias GPUs). A cada passo do
# otimizador ele:
#
# 1. **calcula a taxa de aprendizado só a partir do número do passo** (`get_lr` em
#    `nanomoe/training/train.py`): *warmup* linear nos primeiros `warmup_steps` passos e depois decaimento
#    cosseno até `min_lr` (Loshchilov & Hutter 2016, [SGDR](https://arxiv.org/abs/1608.03983)). O
#    warmup existe porque, no início, o AdamW ainda não tem boas estimativas das médias do gradiente
#    e do seu quadrado: passos grandes nessa hora podem jogar o modelo numa solução ruim (o exercício 4
#    do capítulo 01 mostra, numa semente, um platô desses);
# 2. **soma os gradientes de `grad_accum` micro-lotes**, cada loss dividida pelo número de
#    micro-lotes: o gradiente é a média sobre o lote inteiro, mesmo quando ele não cabe de uma vez
#    na memória (aqui `grad_accum = 1`);
# 3. **corta o gradiente** (*gradient clipping*, `grad_clip = 1.0`): se a norma L2 de todos os
#    gradientes juntos passa de 1, o vetor inteiro é reescalado para norma 1 — mesma direção, passo
#    menor —, e um lote ruim não desmonta o modelo (Pascanu et al. 2012,
#    [*On the difficulty of training RNNs*](https://arxiv.org/abs/1211.5063));
# 4. **dá um passo do AdamW** com *weight decay* 0,1 só nas matrizes e nos embeddings
#    (`GPT.configure_optimizers`): os ganhos das normas e os vieses não encolhem
#    ([AdamW](https://arxiv.org/abs/1711.05101));
# 5. a cada `eval_interval` passos, **mede a loss de validação** em lotes fixos (os mesmos em toda
#    avaliação, para as curvas serem comparáveis entre si e entre configurações).
#
# A precisão mista, o DDP e os checkpoints ficam para o capítulo 04. A taxa de aprendizado de cada
# passo destes treinos:

# %%
fig = plot_lr_schedule(tcfg, save_path=out_dir / "lr_schedule.png")

# %%
results, models = {}, {}
t_all = time.perf_counter()
for name, cfg in configs.items():
    print(f"\n=== {name} ===")
    torch.manual_seed(args.seed)  # same initialization stream for every configuration
    model = GPT(cfg)
    res = train(model, train_ids, val_ids, tcfg, progress=not args.quick)
    results[name] = dict(
        params=model.num_params(non_embedding=False),
        train_loss=res.final.get("train_loss"),
        val_loss=res.final.get("val_loss"),
        history=res.history,
        seconds=res.train_time_s,
    )
    models[name] = model.cpu().eval()
print(f"\nablação completa em {time.perf_counter() - t_all:.0f} s")

# %% [markdown]
# A velocidade de cada treino acima depende de quanto a máquina estava ocupada naquele momento
# (numa CPU compartilhada isso varia muito de um minuto para o outro). Para comparar velocidades
# de forma justa, medimos os passos de treino **lado a lado**: a cada rodada, um passo
# (forward + backward + AdamW) de cada configuração, e tomamos a mediana por configuração.


# %%
def side_by_side_tokens_per_s(cfgs: dict, rounds: int) -> dict[str, float]:
    """Training tokens/s of each config, one step of each per round (after a warm-up round), so a
    busy machine slows every config alike; the median step time over the rounds."""
    prec = pick_precision(args.device, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (args.batch_size, args.block_size), generator=g).to(prec.device)
    y = torch.randint(0, tok.vocab_size, (args.batch_size, args.block_size), generator=g).to(prec.device)
    runs = {}
    for name, cfg in cfgs.items():
        m = GPT(cfg).to(prec.device).train()
        runs[name] = (m, m.configure_optimizers(0.1, args.lr, device_type=prec.device_type))
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(rounds + 1):
        for name, (m, opt) in runs.items():
            t0 = time.perf_counter()
            with prec.autocast():
                _, loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if prec.device_type == "cuda":
                torch.cuda.synchronize()
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: x.numel() / float(np.median(t)) for name, t in times.items()}


speed = side_by_side_tokens_per_s(configs, args.speed_rounds)
for name in results:
    results[name]["tokens_per_s"] = speed[name]

# %%
rows = ["| configuração | parâmetros | tokens/s (lado a lado) | loss treino | loss validação |",
        "|---|---:|---:|---:|---:|"]
for name, r in results.items():
    rows.append(f"| {name} | {r['params']:,} | {r['tokens_per_s']:,.0f} | {r['train_loss']:.4f} | "
                f"{r['val_loss']:.4f} |")
table = "\n".join(rows)
(out_dir / "ablation.md").write_text(table + "\n", encoding="utf-8")
print(table)

# %%
fig = plot_curves({n: r["history"] for n, r in results.items()}, x="tokens", y="val_loss",
                  title="Ablação no Machado de Assis (validação)", figsize=(8, 4.5))
# zoom on the part where the configurations differ (the first evaluations are all ~ln(V))
late = [h["val_loss"] for r in results.values() for h in r["history"] if h["step"] >= args.steps // 4]
if late:
    fig.axes[0].set_ylim(min(late) - 0.05, max(late) + 0.05)
save_figure(fig, out_dir / "ablation_val_loss.png")

# %% [markdown]
# Como ler a tabela (os números da nossa execução estão na seção 10): a loss é a entropia cruzada
# em nats por caractere; a diferença entre duas linhas é o efeito de **um** interruptor, dado tudo
# o que veio antes. Atenção ao número de parâmetros: ele muda ao longo da escada (o RoPE remove a
# tabela `wpe`, o GQA encolhe `c_attn`), então a tabela compara receitas, não modelos do mesmo
# tamanho; o benchmark `scripts/bench_02_modern.py` compara a velocidade do GPT-2 e do moderno
# com quase o mesmo número de parâmetros.
#
# Uma amostra de cada ponta (geração com KV cache, temperatura 0,8):

# %%
prompt = torch.tensor([tok.encode("Capitu")], dtype=torch.long)
for name in (steps[0][0], steps[-1][0]):
    g = torch.Generator().manual_seed(args.seed)
    n_new = min(200, args.block_size - prompt.size(1))
    out = models[name].generate(prompt, n_new, temperature=0.8, top_k=50, generator=g)
    print(f"--- {name} ---\n{tok.decode(out[0].tolist())}\n")

# %% [markdown]
# ## 9. KV cache: gerar sem refazer o passado
#
# Para gerar o token $t+1$ o modelo precisa das chaves e valores de todas as posições
# anteriores — e elas não mudam. Sem cache, cada passo roda o Transformer inteiro sobre o prefixo
# (custo que cresce com $t$; gerar $n$ tokens custa $O(n^2)$ nas projeções e no MLP). Com cache,
# o prompt é processado uma vez (*prefill*) e cada passo processa só o token novo, lendo k e v do
# cache.
#
# Nosso `KVCache` é **pré-alocado** com forma fixa `(n_layer, B, n_kv_head, max_len, head_dim)`:
# nenhum tensor cresce durante a geração, a memória é conhecida de antemão e cada passo tem as
# mesmas formas. A atenção lê o buffer inteiro sob uma máscara que é causal **e** esconde as
# posições ainda vazias. Repare em `mask`: com cache, a consulta $i$ está na posição `pos + i`,
# não em $i$. Usar `is_causal=True` aqui esconderia o passado: com L consultas e S chaves, o SDPA do
# PyTorch alinha a máscara causal ao canto superior esquerdo (a consulta $i$ vê as chaves $0..i$,
# não $0..S-L+i$), então um passo de decodificação (1 consulta) veria só a chave 0. A célula logo
# depois de `KVCache` mostra isso.
#
# **Construa você mesmo.** Antes da versão do pacote, um cache de verdade em poucas linhas: uma lista
# que cresce. Cada passo acrescenta a chave e o valor do token novo e deixa a consulta dele olhar
# todas as posições guardadas; não há máscara, porque o futuro ainda não existe. Usamos as projeções
# `q_h, k_h, v_h` da seção 4 e a `my_attention` de lá como referência (tudo de uma vez, com máscara).

# %%
def my_decode_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cache: dict) -> torch.Tensor:
    """One new token: q_t (H, 1, D); k_t, v_t (Hkv, 1, D); cache {"k", "v"}: (Hkv, t, D) -> (H, 1, D)."""
    cache["k"] = torch.cat((cache["k"], k_t), dim=1)  # keys and values of every position so far
    cache["v"] = torch.cat((cache["v"], v_t), dim=1)
    H, _, D = q_t.shape
    k = cache["k"].repeat_interleave(H // k_t.size(0), dim=0)  # GQA: share each kv head with its group
    v = cache["v"].repeat_interleave(H // v_t.size(0), dim=0)
    return (q_t @ k.transpose(1, 2) / math.sqrt(D)).softmax(-1) @ v  # the newest query sees everything


# %%
my_cache = {"k": torch.zeros(Hkv, 0, Dh), "v": torch.zeros(Hkv, 0, Dh)}
y_steps = torch.cat([my_decode_step(q_h[:, t : t + 1], k_h[:, t : t + 1], v_h[:, t : t + 1], my_cache)
                     for t in range(12)], dim=1)  # (H, 12, D), one token at a time
torch.testing.assert_close(y_steps, my_attention(q_h, k_h, v_h))  # token by token == all at once
kv = KVCache(n_layer=1, batch_size=1, n_kv_head=Hkv, max_len=16, head_dim=Dh)  # the package's, preallocated
y_pkg = []
for t in range(12):
    y_pkg.append(attn(x_att[:, t : t + 1], cache=kv))  # the module writes its k, v into the cache
    kv.advance(1)
torch.testing.assert_close(torch.cat(y_pkg, dim=1)[0], attn.c_proj(y_steps.transpose(0, 1).reshape(12, Hq * Dh)))
print("my_decode_step == my_attention (sem cache) == CausalSelfAttention + KVCache, token a token")

# %%
show_source(KVCache)

# %% [markdown]
# A prova de que `is_causal=True` não serve com cache: 1 consulta (o token novo, na posição 4) e 5
# chaves (as posições 0 a 4 no cache).

# %%
torch.manual_seed(0)
q1, k5, v5 = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)  # (B, H, T, D)
y_causal = F.scaled_dot_product_attention(q1, k5, v5, is_causal=True)
kv5 = KVCache(n_layer=1, batch_size=1, n_kv_head=1, max_len=5, head_dim=8)
kv5.advance(4)  # 4 positions already cached: the new query sits at position 4
y_mask = F.scaled_dot_product_attention(q1, k5, v5, attn_mask=kv5.mask(1))
print("is_causal=True, 1 consulta, 5 chaves == só a chave 0:", torch.allclose(y_causal, v5[:, :, :1]))
y_all = F.scaled_dot_product_attention(q1, k5, v5)  # no mask: the newest token sees every position
print("máscara do KVCache (pos 4) == todas as 5 chaves:", torch.allclose(y_mask, y_all))

# %% [markdown]
# Primeiro, a garantia: com e sem cache, a geração gulosa produz **os mesmos tokens** (e um
# prefill de vários tokens com cache dá os mesmos logits que o forward sem cache, em todas as
# posições).

# %%
mod = models[steps[-1][0]]
p = torch.tensor([tok.encode("Capitu")], dtype=torch.long)
n_new = min(40, args.block_size - p.size(1))
a = mod.generate(p, n_new, temperature=0.0, use_cache=True)
b = mod.generate(p, n_new, temperature=0.0, use_cache=False)
print("mesmos tokens com e sem cache:", torch.equal(a, b))
with torch.no_grad():
    cache = mod.new_cache(1)
    full, _ = mod(a)
    pre, _ = mod(a, cache=cache)
print("max |prefill com cache - forward| =", float((full - pre).abs().max()))

# %% [markdown]
# Agora o tempo por token em função da posição, num modelo com contexto longo
# (`kv_block_size`; pesos aleatórios bastam para medir tempo). Sem cache o custo cresce com a
# posição. Com cache ele fica praticamente constante **nesta implementação**, e o motivo merece
# atenção: a decodificação lê o buffer pré-alocado inteiro (`max_len` posições, a maioria ainda
# vazia e escondida pela máscara), então o primeiro token paga a atenção sobre `max_len` posições
# tanto quanto o último. Em geral a atenção de um passo de decodificação custa $O(t)$ (ela lê as
# $t$ chaves anteriores); o custo fixo aqui é o preço das formas fixas. Num modelo pequeno como
# este, as projeções e o MLP (que não dependem de $t$) dominam de qualquer jeito.

# %%
torch.manual_seed(0)
kv_model = GPT(modern_config(vocab_size=tok.vocab_size, block_size=args.kv_block_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_embd=args.n_embd, n_kv_head=args.n_kv_head)).eval()


def time_per_token(model: GPT, n: int, use_cache: bool) -> list[float]:
    """Seconds between consecutive tokens of one greedy generation."""
    times, t0 = [], time.perf_counter()
    for _ in model.stream(torch.zeros(1, 1, dtype=torch.long), n, temperature=0.0, use_cache=use_cache):
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


time_per_token(kv_model, 8, True), time_per_token(kv_model, 8, False)  # warm-up
n_tok = min(args.kv_tokens, args.kv_block_size - 1)
t_cache = time_per_token(kv_model, n_tok, True)
t_plain = time_per_token(kv_model, n_tok, False)
print(f"{n_tok} tokens: com cache {sum(t_cache):.2f} s, sem cache {sum(t_plain):.2f} s "
      f"({sum(t_plain) / sum(t_cache):.1f}x mais rápido com cache)")


def smooth(v: list[float], w: int = 9) -> np.ndarray:
    w = max(1, min(w, len(v)))
    return np.convolve(np.array(v) * 1e3, np.ones(w) / w, mode="valid")


fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(smooth(t_plain), label="sem cache")
ax.plot(smooth(t_cache), label="com KV cache")
ax.set_xlabel("posição do token gerado")
ax.set_ylabel("ms por token (média móvel)")
ax.set_title(f"Tempo por token ({args.n_layer} camadas, C={args.n_embd}, CPU)")
ax.legend()
ax.grid(alpha=0.3)
save_figure(fig, out_dir / "kv_time_per_token.png")

# %% [markdown]
# ### Quanto de memória o cache ocupa
#
# $$ \text{bytes} = 2\,(k, v) \times n_\text{layer} \times B \times n_\text{kv\_head} \times \text{max\_len}
# \times \text{head\_dim} \times \text{bytes por número} $$
#
# A memória é proporcional a `n_kv_head`: é aí que GQA e MQA brilham. No nosso modelo pequeno
# são poucos MiB; num modelo do tamanho de um Llama 3 8B (32 camadas, 32 cabeças de consulta,
# head_dim 128, contexto 8192, bfloat16) a diferença entre MHA e GQA-8 é de gigabytes por
# sequência. Criamos os caches no dispositivo `meta` do PyTorch, que guarda só as formas — nada é
# alocado.

# %%
def cache_gib(n_layer, n_kv, max_len, head_dim, dtype, batch=1) -> float:
    return KVCache(n_layer, batch, n_kv, max_len, head_dim, dtype=dtype, device="meta").nbytes / 2**30


ours = {f"MHA ({args.n_head})": args.n_head, f"GQA ({args.n_kv_head})": args.n_kv_head, "MQA (1)": 1}
llama = {"MHA (32)": 32, "GQA (8)": 8, "MQA (1)": 1}
hd = args.n_embd // args.n_head
ours_mib = {k: cache_gib(args.n_layer, v, args.kv_block_size, hd, torch.float32) * 1024 for k, v in ours.items()}
llama_gib = {k: cache_gib(32, v, 8192, 128, torch.bfloat16) for k, v in llama.items()}
for k, v in ours_mib.items():
    print(f"nosso modelo, {k:9s}: {v:8.2f} MiB")
for k, v in llama_gib.items():
    print(f"escala Llama 3 8B, {k:9s}: {v:8.2f} GiB")
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].bar(list(ours_mib), list(ours_mib.values()))
axes[0].set_ylabel("MiB")
axes[0].set_title(f"nosso modelo ({args.kv_block_size} posições, fp32)")
axes[1].bar(list(llama_gib), list(llama_gib.values()), color="C1")
axes[1].set_ylabel("GiB")
axes[1].set_title("escala Llama 3 8B (8192 posições, bf16)")
fig.tight_layout()
save_figure(fig, out_dir / "kv_cache_bytes.png")

# %% [markdown]
# ## 10. Resultados que obtivemos
#
# Execução de referência: este notebook, de cima a baixo, com os parâmetros padrão (os mesmos de
# `uv run -m scripts.02_modern_gpt`: 4 camadas, 4 cabeças, C = 128, contexto 128, 300 passos × 16
# sequências = 614 400 caracteres por configuração, tokenizador de caracteres com 126 símbolos,
# `threads=0`, o número de threads padrão do PyTorch). Máquina: VM x86_64 de 2 núcleos (AVX-512),
# PyTorch 2.15 na CPU, dividida com outro treino que rodava ao mesmo tempo. Levou cerca de 12 min
# de relógio, dos quais 704 s no laço dos 7 treinos. Com a mesma semente e os mesmos lotes, as
# losses se repetem entre execuções até a terceira casa decimal (o treino `+no-bias`, refeito em
# outra execução no exercício 2, deu o mesmo 1,9888); os tokens/s dependem de quanto a máquina
# está ocupada e mudam muito entre execuções e até dentro de um treino (de 3629 a 11 503
# tokens/s por trecho de 25 passos nesta execução).
#
# | configuração | parâmetros | tokens/s (lado a lado) | loss treino | loss validação |
# |---|---:|---:|---:|---:|
# | gpt2 (baseline) | 825 856 | 11 092 | 2,3464 | 2,3509 |
# | +rope | 809 472 | 10 501 | 2,0477 | 2,0573 |
# | +rmsnorm | 808 320 | 9867 | 2,0479 | 2,0585 |
# | +swiglu | 825 472 | 10 167 | 1,9558 | 1,9710 |
# | +gqa (n_kv_head=2) | 759 424 | 11 394 | 1,9557 | 1,9735 |
# | +no-bias | 754 560 | 10 908 | 1,9789 | 1,9888 |
# | +softcap (30) | 754 560 | 10 821 | 1,9812 | 1,9957 |
#
# O que a tabela diz, neste orçamento pequeno:
#
# - **RoPE** é de longe o maior ganho (−0,29 nat): a tabela `wpe` precisa aprender cada uma das
#   128 posições a partir dos dados, enquanto o RoPE entrega a posição relativa de graça (e ainda
#   tira 16 mil parâmetros).
# - **RMSNorm** não muda a loss (+0,001) — é o que o artigo promete: a mesma qualidade com uma
#   conta mais simples. (Na CPU da execução de referência ele não é mais rápido: o LayerNorm do
#   PyTorch é um kernel fundido, o nosso RMSNorm é uma sequência de operações separadas (quadrado,
#   média, soma, `rsqrt`, dois produtos). Numa GPU, com `torch.compile` fundindo essas operações,
#   esperamos que a ordem se inverta, mas não medimos ainda.)
# - **SwiGLU** é o segundo ganho (−0,09 nat), com praticamente os mesmos parâmetros.
# - **GQA** (2 cabeças de k/v para 4 de consulta) custa +0,0025 nat com 8% menos parâmetros e
#   corta o KV cache pela metade.
# - **Sem viés** (+0,015) e **soft-cap 30** (+0,007) ficam ligeiramente piores aqui. Nenhum dos
#   dois foi proposto para melhorar a loss de um modelo pequeno: o PaLM tira os vieses pela
#   estabilidade de treinos enormes, e o cap de 30 quase não age quando os logits ficam bem abaixo
#   de 30, como num modelo de caracteres no início do treino. Diferenças desse tamanho (~0,01)
#   não permitem conclusão com uma semente só.
# - No total, o modelo moderno chega a 1,996 contra 2,351 do GPT-2, com 9% menos parâmetros.


# %% [markdown]
# ## 11. Exercícios
#
# Preveja o resultado antes de abrir a resposta. As respostas foram medidas com o código deste
# capítulo, na configuração padrão (4 camadas, C = 128, contexto 128, 300 passos de 16 sequências,
# semente 1337), 1 thread, numa CPU de 2 núcleos compartilhada.
#
# **1. Quantas cabeças de chave/valor?** A ablação termina com `n_kv_head = 2`. Com 4 (MHA) e 1
# (MQA), quanto ocupa o KV cache do nosso modelo com 1024 posições, e quanto muda a loss de
# validação? Rode `uv run -m scripts.02_modern_gpt --n_kv_head=1` (ou `=4`) e leia a linha `+no-bias`.
#
# <details><summary>Resposta</summary>
#
# | `n_kv_head` | parâmetros | KV cache (1024 posições, fp32) | loss de validação |
# |---|---:|---:|---:|
# | 4 (MHA) | 820 096 | 4,00 MiB | 1,971 |
# | 2 (GQA) | 754 560 | 2,00 MiB | 1,989 |
# | 1 (MQA) | 721 792 | 1,00 MiB | 2,010 |
#
# O cache é exatamente proporcional a `n_kv_head` (a seção 9 calcula: 2 × 4 camadas × n_kv_head ×
# 1024 posições × 32 dimensões × 4 bytes). A loss piora ~0,02 nat a cada vez que as cabeças de k/v
# caem pela metade: neste modelo pequeno, menos cabeças de k/v também são menos parâmetros (−8% e
# −12%). Num modelo grande a conta é outra: o cache de um Llama 3 8B cai de 4 GiB para 1 GiB por
# sequência de 8192 tokens, e o artigo do GQA mostra qualidade quase igual à do MHA. A linha GQA é
# a `+no-bias` da ablação acima, e a linha MQA é o modelo denso do capítulo 03 (mesma receita); as
# losses estão com três casas porque a quarta muda de uma execução para outra.
#
# </details>
#
# **2. A base do RoPE.** `rope_theta` (10 000 por padrão; o Llama 3 usa 500 000) define quão devagar
# giram os pares de dimensões. Com o contexto de 128 posições deste capítulo, um θ de 100 ou de
# 1 000 000 ajudaria ou atrapalharia? Troque a configuração final e treine:
#
# ```python
# cfg = modern_config(**shape, n_kv_head=2, rope_theta=100.0)  # ou 1e6
# torch.manual_seed(args.seed)
# print(train(GPT(cfg), train_ids, val_ids, tcfg, progress=False).final["val_loss"])
# ```
#
# <details><summary>Resposta</summary>
#
# | `rope_theta` | loss de validação | quanto gira o par mais lento em 127 posições |
# |---:|---:|---:|
# | 100 | 1,9755 | 1,69 rad |
# | 10 000 (padrão) | 1,9888 | 0,023 rad |
# | 1 000 000 | 1,9905 | 0,0003 rad |
#
# Os três treinos são de uma mesma execução (`docs/results/02/exercicios.md`; o padrão deu 1,9888,
# o mesmo valor da linha `+no-bias` da ablação acima, que veio de outra execução). Neste
# contexto curto, a base menor ganhou (−0,013 nat) e a maior perdeu um pouco (+0,002). Com
# head_dim 32 há 16 pares; com θ = 10 000, 6 deles giram menos de 0,5 rad em 127 posições, e com
# 1 000 000 são 9: esses pares quase não mudam com a posição e pouco ajudam a distinguir distâncias
# dentro de 128 tokens. Com θ = 100 todos os pares giram o bastante. A base grande existe para
# contextos longos: o Llama 3 usa 500 000 para que os pares lentos não deem a volta inteira em
# dezenas de milhares de tokens. (Uma semente só: diferenças de ~0,01 pedem mais sementes para uma
# conclusão firme.)
#
# </details>
#
# **3. O cache e o vocabulário.** Com cache, gerar 1000 tokens com o modelo de caracteres do benchmark
# (V = 128) é muito mais rápido que sem cache. Com o vocabulário do GPT-2 (V = 50 304) e o mesmo modelo, o
# ganho fica maior, igual ou menor? Meça com `uv run -m scripts.bench_02_modern --threads=1`.
#
# <details><summary>Resposta</summary>
#
# Menor. No benchmark (`docs/benchmarks.md`, CPU de 2 núcleos, 1 thread): 28,9× com V = 128 e
# só 4,2× com V = 50 304 (entre rodadas, de 21,9× a 56,7× e de 4,2× a 8,6×). O cache elimina o
# trabalho repetido das camadas, mas não o da camada de
# saída: a multiplicação pela matriz 50 304 × 128 custa o mesmo com ou sem cache, a cada token, e
# passa a dominar o passo (2 a 7 ms contra ~1 ms das 4 camadas). É a lei de Amdahl: o ganho de
# otimizar uma parte é limitado pelo que sobra.
#
# </details>

# %% [markdown]
# ## O que você aprendeu
#
# - Cada ideia moderna é um campo de `GPTConfig`; `gpt2_config()` e `modern_config()` são as
#   duas pontas, e a ablação mostra o caminho entre elas. Neste orçamento (uma semente), o RoPE é o
#   maior ganho e o SwiGLU o segundo; RMSNorm, sem viés e soft-cap mudam a loss em 0,015 nat ou menos, menos do que
#   uma semente só permite separar do acaso.
# - RoPE gira pares de dimensões de q e k; o produto escalar passa a depender só da distância.
#   RMSNorm só reescala; SwiGLU multiplica duas projeções, uma delas passada pela SiLU. Você
#   escreveu cada um em poucas linhas e conferiu contra o pacote.
# - GQA/MQA compartilham as cabeças de chave/valor entre grupos de consultas: o KV cache encolhe
#   por `n_head / n_kv_head`, ao preço de um pouco de loss.
# - O KV cache dá exatamente os mesmos tokens que a geração sem cache. O nosso é pré-alocado, então
#   o custo por token fica constante (a atenção lê o buffer inteiro); em geral a atenção de um passo
#   custa $O(t)$.
# - `nanomoe.training.train` faz, a cada passo: taxa de aprendizado com *warmup* e decaimento
#   cosseno, acumulação de gradiente, *gradient clipping* e AdamW com *weight decay* só nas matrizes.
#
# **Para ler.** Os artigos de cada interruptor estão na tabela do início. E também: Touvron et al.
# 2023, [*LLaMA*](https://arxiv.org/abs/2302.13971); Llama Team 2024,
# [*The Llama 3 Herd of Models*](https://arxiv.org/abs/2407.21783); Jiang et al. 2023,
# [*Mistral 7B*](https://arxiv.org/abs/2310.06825); Rabe & Staats 2021,
# [*Self-attention Does Not Need O(n²) Memory*](https://arxiv.org/abs/2112.05682) (o kernel
# *memory-efficient*); Loshchilov & Hutter 2016, [*SGDR*](https://arxiv.org/abs/1608.03983) e 2017,
# [*AdamW*](https://arxiv.org/abs/1711.05101); Pascanu et al. 2012,
# [*On the difficulty of training RNNs*](https://arxiv.org/abs/1211.5063) (clipping). Termos:
# [glossário](../docs/glossario.md).
#
# Próximo capítulo: trocar o MLP por uma **mistura de especialistas** (MoE).
