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
# # Capítulo 05 — Pesos do GPT-2: carregar exato, ajustar ao português, transferir e fazer *upcycling* para MoE
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/05_gpt2_weights.ipynb)
#
# Treinar do zero custa caro. A OpenAI já pagou o pré-treino do GPT-2 (124M parâmetros, ~40 GB de
# texto da web, quase tudo em inglês); neste capítulo reaproveitamos esses pesos de quatro jeitos:
#
# 1. **Carregar exato.** `from_pretrained("gpt2")` copia *cada* tensor do GPT-2 da Hugging Face
#    para o nosso `GPT` e *prova* que os logits são os mesmos do `transformers`: a diferença máxima
#    é arredondamento de float32 (1,7e-6 no substituto minúsculo das saídas registradas abaixo; com o
#    GPT-2 124M real, não medido ainda neste curso; a célula exige < 1e-4). A carga é estrita: um
#    `load_state_dict(strict=False)` deixaria tensores esquecidos na inicialização aleatória, sem aviso.
# 2. **Ajuste fino (*fine-tuning*) em Machado de Assis** com o BPE do GPT-2: partindo dos pesos
#    pré-treinados *versus* do zero, com os mesmos passos e os mesmos lotes.
# 3. **Transferência parcial** para a arquitetura moderna do capítulo 02 (RoPE, RMSNorm, SwiGLU,
#    GQA com `n_head // 4` cabeças de k/v, que no GPT-2 minúsculo de 4 cabeças vira MQA, 1 cabeça;
#    sem viés): o que tem significado é copiado ou adaptado, o resto é inicializado, e um
#    relatório diz o que aconteceu com cada tensor.
# 4. **Sparse upcycling** ([Komatsuzaki et al., 2022](https://arxiv.org/abs/2212.05055)): um MoE cujos
#    especialistas nascem como cópias do MLP denso — no passo 0, com top-2 ou mais, ele calcula os
#    mesmos logits do modelo denso (a menos de arredondamento).
#
# No fim, exportamos o MoE como uma pasta que o `transformers` abre como `MixtralForCausalLM`.
#
# **Pesos e internet.** Os pesos do GPT-2 vêm do Hugging Face Hub, o que exige internet na
# primeira vez (depois ficam no cache). Sem internet — ou na configuração mínima `--tiny` para CPU
# — o notebook usa um **substituto**: um GPT-2 minúsculo (2 camadas, 64 dimensões, o mesmo
# tokenizador de 50 257 tokens), salvo numa pasta local com `save_pretrained` exatamente como a do
# Hub e pré-treinado aqui mesmo por alguns segundos em TinyShakespeare (inglês, como o GPT-2). A
# saída diz sempre qual dos dois rodou. Tempo: ~2,7 min na configuração `--tiny` numa CPU de 2
# núcleos, 1 thread (as saídas registradas); numa T4 do Colab, com os pesos reais, não medido
# ainda.

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

device = setup("05", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %% [markdown]
# ## Parâmetros
#
# Há dois tamanhos, `full` (GPT-2 124M do Hub) e `tiny` (o substituto minúsculo). Sem `--tiny` nem
# `--full`, o tamanho é `full` quando há GPU CUDA e `tiny` nos outros casos (CPU, MPS); as duas
# flags forçam um ou outro. Os campos `None` dependem do tamanho (tabela `SIZES`). Num script:
# `uv run -m scripts.05_gpt2_weights --tiny --steps=200`; num notebook, edite `DEFAULTS` ou use a
# variável de ambiente `NANOMOE_ARGS`.

# %%
import copy
import math
from pathlib import Path

import numpy as np
import torch

from nanomoe import GPT, modern_config
from nanomoe.device import pick_device
from nanomoe.training.cli import parse_args

DEFAULTS = dict(
    model="gpt2",  # hub name ("gpt2", "gpt2-medium", ...) or a local save_pretrained folder
    tiny=False,  # force the tiny CPU configuration (offline stand-in for GPT-2)
    full=False,  # force the full configuration (real GPT-2) even without a GPU
    quick=False,  # a few steps of everything (tests)
    steps=None,  # fine-tuning steps of each run in parts 2 and 3
    moe_steps=None,  # steps of the upcycled MoE and of its dense twin (part 4)
    batch_size=None,
    block_size=None,  # training sequence length
    lr_finetune=None,  # peak lr when starting from pretrained weights
    lr_scratch=None,  # peak lr when starting from random weights (and for partial transfer)
    eval_interval=None,
    eval_iters=None,
    standin_steps=None,  # pre-training steps of the offline stand-in on TinyShakespeare (0 = random)
    standin_layers=2,  # size of the offline stand-in GPT-2
    standin_embd=64,
    n_experts=4,
    moe_top_k=2,
    noise_std=0.0,  # relative noise added to each upcycled expert (0 = exact copies)
    sample_tokens=None,
    prompt="Capitu",
    max_chars=0,  # 0 = the whole Machado corpus
    device="auto",
    dtype="auto",
    seed=1337,
    out_dir="runs/05",
)
SIZES = {
    "full": dict(steps=300, moe_steps=150, batch_size=8, block_size=256, lr_finetune=1e-4, lr_scratch=6e-4,
                 eval_interval=50, eval_iters=20, standin_steps=0, sample_tokens=60),
    "tiny": dict(steps=60, moe_steps=30, batch_size=4, block_size=64, lr_finetune=1e-3, lr_scratch=1e-3,
                 eval_interval=10, eval_iters=4, standin_steps=100, sample_tokens=30),
}
QUICK = dict(tiny=True, steps=2, moe_steps=1, batch_size=2, block_size=8, eval_interval=2, eval_iters=1,
             standin_steps=1, standin_layers=1, standin_embd=32, sample_tokens=4, max_chars=50_000)
args = parse_args(DEFAULTS, quick=QUICK)

device = pick_device(args.device)
size = "tiny" if args.tiny else "full" if (args.full or device.startswith("cuda")) else "tiny"
unset = [k for k in SIZES[size] if getattr(args, k) is None]  # filled from the size's table
for k in unset:
    setattr(args, k, SIZES[size][k])
out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
print(f"device: {device} | configuration: {size}" + (" (quick)" if args.quick else ""))

# %% [markdown]
# ## 1. Carregar o GPT-2 exatamente
#
# O `GPT2LMHeadModel` da Hugging Face e o nosso `GPT` (preset `gpt2`) têm a mesma arquitetura e
# até os mesmos nomes de parâmetros (`transformer.h.0.attn.c_attn.weight`, ...). A única pegadinha:
# o GPT-2 original usa `Conv1D`, que guarda a matriz como (entrada, saída) e calcula `x @ W + b`;
# o `nn.Linear` guarda (saída, entrada) e calcula `x @ Wᵀ + b`. Então toda matriz de projeção é
# **transposta** na cópia (copiar sem transpor dá erro de forma — ou, pior, numa matriz quadrada
# como `c_proj`, um modelo que roda e calcula outra coisa).
#
# `nanomoe.interop.hf.from_hf` monta o `state_dict` de destino e carrega com checagem estrita de nomes e
# formas: nenhum tensor fica esquecido na inicialização aleatória. Depois comparamos os logits com
# os do próprio `transformers` na mesma entrada.

# %%
from nanomoe.data import DataError, gpt2_tokenizer, read_corpus
from nanomoe.interop.hf import HFConversionError, from_hf, load_hf_model, save_random_gpt2
from nanomoe.training.train import TrainConfig, train

tok = gpt2_tokenizer()  # tiktoken's GPT-2 BPE (downloaded once, then cached; see nanomoe.tokenizer)


def train_run(model, train_ids, val_ids, lr, steps, name):
    """Fine-tune `model` in place with the chapter's settings; returns TrainResult."""
    tcfg = TrainConfig(
        max_steps=steps, batch_size=args.batch_size, block_size=args.block_size, lr=lr, min_lr=lr / 10,
        warmup_steps=max(1, steps // 10), weight_decay=0.1, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, log_interval=max(1, args.eval_interval // 2), device=device,
        dtype=args.dtype, seed=args.seed, out_dir=None, sample_tokens=0,
    )
    print(f"--- {name}: {model.num_params(non_embedding=False) / 1e6:.1f}M params, lr {lr:g}, {steps} steps")
    return train(model, train_ids, val_ids, tcfg)


def split(ids, frac=0.9):
    ids = np.asarray(ids, dtype=np.uint16)  # GPT-2's 50257 ids fit in 16 bits
    n = int(len(ids) * frac)
    return ids[:n], ids[n:]


source = None  # "hub" or "stand-in"
hf_model, standin_trained = None, 0
if size == "full":
    try:
        hf_model = load_hf_model(args.model)
        source = "hub"
    except HFConversionError as e:
        print(f"!! could not load {args.model!r}: {e}\n!! falling back to the tiny offline stand-in")
        size = "tiny"
        for k in unset:
            setattr(args, k, SIZES["tiny"][k])
if hf_model is None:
    # Offline stand-in: a tiny GPT2LMHeadModel saved with save_pretrained (like the hub's folder),
    # optionally pre-trained here on TinyShakespeare (English), then loaded through the same path.
    folder = save_random_gpt2(out_dir / "standin-gpt2", n_layer=args.standin_layers, n_head=4, n_embd=args.standin_embd,
                              block_size=256, seed=args.seed)
    source = "stand-in"
    if args.standin_steps > 0:
        try:
            shakespeare = read_corpus("tinyshakespeare")
        except DataError as e:
            print(f"TinyShakespeare not available ({e}); the stand-in stays random")
            shakespeare = None
        if shakespeare is not None:
            from nanomoe.interop.hf import export_hf

            pre = from_hf(load_hf_model(folder))
            tr, va = split(tok.encode(shakespeare))
            train_run(pre, tr, va, args.lr_scratch, args.standin_steps, "pre-training the stand-in on TinyShakespeare")
            export_hf(pre.cpu(), folder, tokenizer=tok)  # back to a Hugging Face folder
            standin_trained = args.standin_steps
    hf_model = load_hf_model(folder)

what = {
    "hub": f"REAL pretrained weights: {args.model!r} from the Hugging Face hub",
    "stand-in": (f"STAND-IN, not OpenAI's GPT-2: a tiny GPT-2 ({args.standin_layers} layers, {args.standin_embd} dims, "
                 "GPT-2 tokenizer) "
                 + (f"pre-trained here for {standin_trained} steps on TinyShakespeare" if standin_trained
                    else "with random weights")),
}[source]
print("weights:", what)

pretrained = from_hf(hf_model)  # every tensor copied, Conv1D transposed
x = torch.tensor([tok.encode("Capitu tinha olhos de ressaca.")])
with torch.no_grad():
    diff = (pretrained(x)[0] - hf_model(x).logits).abs().max().item()
pc = pretrained.config
print(f"config: {pc.n_layer} layers, {pc.n_head} heads, n_embd {pc.n_embd}, vocab {pc.vocab_size}, "
      f"block_size {pc.block_size}")
print(f"max |logits(nanomoe) - logits(transformers)| = {diff:.2e}")
assert diff < 1e-4, "the conversion is not exact"
pretrained_state = copy.deepcopy(pretrained.state_dict())  # the untouched weights, reused in parts 3 and 4

# %% [markdown]
# A transposição, à mão: pegamos um `Conv1D` do `state_dict` do `transformers` e montamos o peso do
# nosso `nn.Linear` com `.T`, comparando com o tensor que o pacote carregou. Sem transpor, o
# `c_fc` do MLP nem cabe (forma trocada), e o `c_proj` da atenção, quadrado, cabe mas guarda
# outros números.

# %%
hf_state = hf_model.state_dict()
name = "transformer.h.0.mlp.c_fc.weight"
w_conv = hf_state[name]  # Conv1D: (in, out) = (n_embd, 4 n_embd), y = x @ W + b
w_linear = w_conv.T  # nn.Linear: (out, in), y = x @ W.T + b
w_pkg = pretrained.state_dict()[name]
assert torch.equal(w_linear, w_pkg)
print(f"igual ao pacote: {name} {tuple(w_conv.shape)} -> {tuple(w_linear.shape)}")
# without the transpose: c_fc has the wrong shape; the square attn.c_proj fits, with other numbers
assert w_conv.shape != w_pkg.shape
sq = "transformer.h.0.attn.c_proj.weight"
wrong = (hf_state[sq] - pretrained.state_dict()[sq]).abs().max().item()
print(f"sem transpor: c_fc {tuple(w_conv.shape)} ≠ {tuple(w_pkg.shape)}; "
      f"{sq} {tuple(hf_state[sq].shape)} cabe, mas difere em até {wrong:.2e}")
del hf_model, hf_state

# %% [markdown]
# ## 2. Ajuste fino em Machado de Assis: pré-treinado × do zero
#
# O BPE do GPT-2 foi treinado em inglês: em Machado ele gasta ~0,41 token por caractere, contra
# ~0,31 de um BPE treinado no próprio Machado (capítulo 04) — palavras como "ressaca" viram vários
# pedaços. Mesmo assim o GPT-2 deve ter visto um pouco de português (o WebText descartou as páginas
# que não eram em inglês, mas nenhum filtro é perfeito), e muito de "como texto funciona".
#
# Dois treinos com **os mesmos passos, os mesmos lotes** (a semente fixa a ordem dos dados) e o
# mesmo modelo: um parte dos pesos pré-treinados, o outro da inicialização aleatória. Com o GPT-2
# real, o ajuste fino usa uma taxa de aprendizado menor (1e-4, para não apagar o que o modelo sabe)
# que o treino do zero (6e-4, a do nanoGPT); o substituto minúsculo, pré-treinado só por alguns
# segundos, usa a mesma taxa (1e-3) nos dois — aí a única diferença é o ponto de partida.

# %%
text = read_corpus("machado")
if args.max_chars:
    text = text[: args.max_chars]
ids = tok.encode(text)
train_ids, val_ids = split(ids)
print(f"Machado: {len(text):,} characters -> {len(ids):,} GPT-2 tokens ({len(ids) / len(text):.3f} tokens/char); "
      f"train {len(train_ids):,} / val {len(val_ids):,}")


def sample(model, n=None, seed=0):
    """A short continuation of the prompt (temperature 0.8, top-k 50, fixed seed)."""
    model.eval()
    dev = next(model.parameters()).device
    idx = torch.tensor([tok.encode(args.prompt)], device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, n or args.sample_tokens, temperature=0.8, top_k=50, generator=g)
    return tok.decode(out[0].tolist())


print("before fine-tuning:\n ", sample(pretrained).replace("\n", "\n  "))

# %%
torch.manual_seed(args.seed)
scratch = GPT(pretrained.config)  # same architecture, random init
res_pre = train_run(pretrained, train_ids, val_ids, args.lr_finetune, args.steps, "GPT-2 from pretrained weights")
res_scratch = train_run(scratch, train_ids, val_ids, args.lr_scratch, args.steps, "GPT-2 from scratch")
print("after fine-tuning (pretrained):\n ", sample(pretrained).replace("\n", "\n  "))
print("after training (from scratch):\n ", sample(scratch).replace("\n", "\n  "))
del scratch

# %% [markdown]
# ## 3. Transferência parcial para a arquitetura moderna
#
# A arquitetura moderna (capítulo 02) não é o GPT-2, mas muita coisa tem o mesmo papel nas duas.
# `nanomoe.interop.transfer.transfer_weights(src, dst)` copia o que tem significado, adapta o que dá para
# adaptar e deixa o resto com a inicialização do próprio destino:
#
# | tensor do destino | o que acontece |
# |---|---|
# | embeddings `wte` (e `lm_head`, amarrado) | **copiado**: mesmo tokenizador, mesmas linhas |
# | atenção `c_attn` | q **copiado**; k e v **adaptados**: cada cabeça de k/v é a **média** do seu grupo ([GQA][gqa]) |
# | atenção `c_proj` | **copiado** |
# | ganhos das normas | **copiados** (o ganho do LayerNorm vira o ganho do RMSNorm) |
# | MLP SwiGLU | **inicializado**: a GELU do GPT-2 é outra função, com outra largura |
#
# e lista como **ignorados** (*skipped*) os tensores da origem sem destino: a tabela de posições
# aprendidas (com RoPE a posição é uma rotação de q e k, não um vetor somado), os vieses (o destino
# tem `bias=False`) e o MLP GELU. Atenção: q e k foram treinados com posições absolutas somadas
# à entrada, e agora são rotacionados pela RoPE — o ponto de partida é imperfeito, e o treino
# precisa reajustá-los.
#
# A comparação justa é com a mesma arquitetura moderna treinada do zero, mesmos passos e mesma taxa.
#
# [gqa]: https://arxiv.org/abs/2305.13245

# %%
from nanomoe.interop.transfer import transfer_weights, upcycle_to_moe

c = pretrained.config
modern_cfg = modern_config(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd)
gpt2_orig = GPT(c)
gpt2_orig.load_state_dict(pretrained_state)  # the pretrained weights, before fine-tuning
del pretrained
torch.manual_seed(args.seed)
modern_transfer = GPT(modern_cfg)
report = transfer_weights(gpt2_orig, modern_transfer)
print(f"modern config: RoPE, RMSNorm, SwiGLU (hidden {modern_cfg.hidden_dim}), n_kv_head {modern_cfg.kv_heads} "
      f"of {modern_cfg.n_head} heads, bias=False, tied embeddings\n")
print(report)
del gpt2_orig

# %% [markdown]
# Em figura: que fração dos parâmetros do modelo moderno veio do GPT-2. Com o vocabulário de 50 257
# tokens, o embedding domina a conta; sem ele, vê-se o que acontece nos blocos: a atenção
# reaproveitada (copiada ou adaptada) e o MLP SwiGLU começando do zero.

# %%
import matplotlib.pyplot as plt

from nanomoe.course.plots import save_figure

actions = {"copied": ("copiado", "C2"), "adapted": ("adaptado", "C0"), "initialized": ("inicializado", "C3")}
rows = {"todos os parâmetros": lambda name: True, "sem o embedding": lambda name: "wte" not in name}
fig, ax = plt.subplots(figsize=(8, 2.2))
for y, (row, keep) in enumerate(rows.items()):
    n = {a: sum(math.prod(e.dst_shape) for e in report.entries if e.action == a and e.dst and keep(e.dst))
         for a in actions}
    left = 0.0
    for a, (label, color) in actions.items():
        share = n[a] / sum(n.values())
        ax.barh(y, share, left=left, color=color, label=label if y == 0 else None)
        if share > 0.04:
            ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", color="white", fontsize=9)
        left += share
ax.set_yticks(range(len(rows)), list(rows))
ax.set_xlim(0, 1)
ax.set_xlabel("fração dos parâmetros do modelo moderno")
ax.set_title(f"Transferência GPT-2 → moderno ({'GPT-2 real' if source == 'hub' else 'substituto minúsculo'})")
ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), frameon=False)
save_figure(fig, out_dir / "transfer_shares.png")

# %%
torch.manual_seed(args.seed)
modern_scratch = GPT(modern_cfg)
res_transfer = train_run(modern_transfer, train_ids, val_ids, args.lr_scratch, args.steps,
                         "modern, partial transfer from GPT-2")
res_modern = train_run(modern_scratch, train_ids, val_ids, args.lr_scratch, args.steps, "modern, from scratch")
print("modern after partial transfer + fine-tuning:\n ", sample(modern_transfer).replace("\n", "\n  "))
del modern_scratch

# %% [markdown]
# ## 4. *Sparse upcycling*: do modelo denso para um MoE
#
# Komatsuzaki et al. (2022), "Sparse Upcycling: Training Mixture-of-Experts from Dense
# Checkpoints": em vez de treinar um MoE do zero, cada especialista começa como uma **cópia do MLP
# denso** e só o roteador é novo. Como os k especialistas escolhidos são idênticos e as portas,
# renormalizadas, somam 1:
#
# $$y = \sum_{i \in \text{top-}k} g_i\, E_i(x) = \Big(\sum_i g_i\Big)\,\text{MLP}(x) = \text{MLP}(x),$$
#
# ou seja, **no passo 0 o MoE calcula os logits do modelo denso** (checado abaixo; a diferença é só
# arredondamento). **Só com $k \ge 2$:** com top-1 a porta é a probabilidade crua $g = p_i < 1$ (a
# renormalização daria 1 e cortaria o gradiente do roteador, capítulo 03), então o MoE começa com a
# saída do MLP multiplicada por $p_i$, não igual a ela (exercício 2). Os
# especialistas têm a largura do MLP denso (não a largura "de ativos iguais" do capítulo 03): o
# MLP do MoE custa ~k vezes o do denso por token (o resto do modelo, igual), e tem E vezes os seus
# parâmetros. Neste modelo minúsculo quase tudo é a tabela de embeddings (50 257 × 64), então os
# ativos quase não mudam: 3,4 milhões contra 3,3 milhões do denso (saída abaixo). O treino então
# separa os especialistas (com `noise_std > 0` eles já nascem levemente diferentes).
#
# A comparação justa: o mesmo modelo denso continuando o treino pelos mesmos passos.

# %%
dense = modern_transfer.cpu().eval()
moe, moe_report = upcycle_to_moe(dense, args.n_experts, args.moe_top_k, noise_std=args.noise_std, return_report=True)
print(moe_report, "\n")
with torch.no_grad():
    d = (moe.eval()(x)[0] - dense(x)[0]).abs().max().item()
print(f"step 0: max |logits(upcycled MoE) - logits(dense)| = {d:.2e}"
      + (" (noise_std > 0: not expected to be 0)" if args.noise_std else ""))
print(f"params: dense {dense.num_params(non_embedding=False) / 1e6:.1f}M | "
      f"MoE {moe.num_params(non_embedding=False) / 1e6:.1f}M total, "
      f"{moe.num_params(non_embedding=False, active=True) / 1e6:.1f}M active per token")

# %% [markdown]
# O *upcycling* à mão: os pesos do MLP denso, transpostos para a convenção `x @ W` dos especialistas
# empilhados (capítulo 03), repetidos E vezes com `torch.stack`. O roteador não tem de onde vir:
# é novo (inicialização do próprio MoE). Comparamos com o MoE que `upcycle_to_moe` criou.

# %%
E = args.n_experts
for blk_d, blk_m in zip(dense.transformer.h, moe.transformer.h):
    fc = torch.stack([blk_d.mlp.c_fc.weight.T] * E)  # (E, C, 2H): E copies of the dense c_fc
    proj = torch.stack([blk_d.mlp.c_proj.weight.T] * E)  # (E, H, C)
    if args.noise_std == 0:  # with noise the copies are perturbed on purpose
        assert torch.equal(fc, blk_m.mlp.experts.c_fc) and torch.equal(proj, blk_m.mlp.experts.c_proj)
router = moe.transformer.h[0].mlp.router.weight  # (E, C): new, no counterpart in the dense model
assert not any("router" in k for k in dense.state_dict())
print(f"igual ao pacote (camadas: {len(moe.transformer.h)}): especialistas {tuple(fc.shape)} e {tuple(proj.shape)}"
      + (" (só formas: noise_std > 0)" if args.noise_std else "") + f"; roteador novo {tuple(router.shape)}")

# %%
dense_more = copy.deepcopy(dense)
res_moe = train_run(moe, train_ids, val_ids, args.lr_finetune, args.moe_steps,
                    f"upcycled MoE ({args.n_experts} experts, top-{args.moe_top_k})")
res_dense = train_run(dense_more, train_ids, val_ids, args.lr_finetune, args.moe_steps, "dense, continued")
print("upcycled MoE after fine-tuning:\n ", sample(moe).replace("\n", "\n  "))

# %% [markdown]
# ## Curvas e resumo
#
# Loss de validação (entropia cruzada, sem as losses auxiliares do MoE) nos mesmos lotes de
# validação em toda avaliação. No painel do MoE, o passo 0 das duas curvas coincide: é o mesmo
# modelo denso, com especialistas idênticos.

# %%
from nanomoe.course.plots import plot_panels

panels = {
    "GPT-2: pré-treinado × do zero": {"pré-treinado": res_pre.history, "do zero": res_scratch.history},
    "moderno: transferência × do zero": {"transferência parcial": res_transfer.history, "do zero": res_modern.history},
    "upcycling: MoE × denso": {f"MoE {args.n_experts}x top-{args.moe_top_k}": res_moe.history,
                               "denso": res_dense.history},
}
title = f"Capítulo 05 — {size} ({'GPT-2 real' if source == 'hub' else 'substituto minúsculo'}), {device}"
fig = plot_panels(panels, x="step", y="val_loss", title=title, save_path=out_dir / "val_curves.png")

rows = [
    ("GPT-2 pretrained", res_pre), ("GPT-2 scratch", res_scratch), ("modern transfer", res_transfer),
    ("modern scratch", res_modern), ("MoE upcycled", res_moe), ("dense continued", res_dense),
]
print(f"weights: {what}\n")
print(f"{'run':<18} {'val loss @0':>11} {'val loss end':>12} {'val ppl end':>11} {'tokens/s':>9}")
for name, r in rows:
    h0, h1 = r.history[0], r.final
    print(f"{name:<18} {h0['val_loss']:>11.3f} {h1['val_loss']:>12.3f} {h1['val_ppl']:>11.1f} {r.tokens_per_s:>9,.0f}")
print(f"\nfigure: {out_dir / 'val_curves.png'}")

# %% [markdown]
# ## Exportar para o ecossistema Hugging Face
#
# `export_hf` escolhe a família pela configuração — GPT-2 → `GPT2LMHeadModel`, moderno denso →
# `LlamaForCausalLM`, MoE → `MixtralForCausalLM` — e salva uma pasta (`config.json` +
# `model.safetensors`) mais o tokenizador (`nanomoe_tokenizer.json`, e os arquivos do tokenizador
# GPT-2 da Hugging Face). Qualquer ferramenta do ecossistema abre a pasta; conferimos que os logits
# são os mesmos e que `load_hf` traz o modelo de volta.

# %%
from transformers import AutoModelForCausalLM

from nanomoe.interop.hf import export_hf, load_hf

moe = moe.cpu().eval()
folder = export_hf(moe, out_dir / "moe-hf", tokenizer=tok)
hf_moe = AutoModelForCausalLM.from_pretrained(folder).eval()
back, back_tok = load_hf(folder)
with torch.no_grad():
    ours = moe(x)[0]
    print(f"{type(hf_moe).__name__}: max |logits diff| = {(ours - hf_moe(x).logits).abs().max().item():.2e}")
    print(f"load_hf round trip: max |logits diff| = {(ours - back(x)[0]).abs().max().item():.2e}, tokenizer {back_tok}")
print("files:", sorted(p.name for p in folder.iterdir()))

# %% [markdown]
# ## O que observar
#
# - **Exatidão primeiro.** A diferença de logits entre o nosso GPT-2 e o do `transformers` é
#   arredondamento de float32 (1,7e-6 no substituto das saídas registradas; com o GPT-2 real, não
#   medido ainda); um erro de transposição daria pesos errados (até 5,85e-2 de diferença no `c_proj`
#   da atenção, acima) e logits muito mais distantes (não medido aqui).
#   O mesmo vale para o MoE exportado como Mixtral e para a volta com `load_hf`.
# - **Pré-treino vale ouro.** Até o substituto, pré-treinado por segundos em inglês, começa em 9,472
#   de validação em Machado, abaixo de ln(50 257) ≈ 10,8 (o "chute uniforme" de um modelo aleatório;
#   com os pesos reais do GPT-2, não medido ainda), e o modelo do zero
#   gasta a maior parte dos passos aprendendo o básico que o pré-treinado já sabe.
# - **Transferência parcial** ajudou menos que o ajuste fino do próprio GPT-2, sobretudo no começo
#   (no passo 10, ~1,1 nat abaixo do moderno do zero, contra ~1,4 do pré-treinado sobre o GPT-2 do
#   zero; no fim, ~0,52 contra ~0,56, numa semente só): o MLP (dois terços dos parâmetros de cada
#   bloco do GPT-2) recomeça do zero, e q/k mudam de posições absolutas para RoPE.
#   Por isso o passo 0 pode ser *pior* que o de um modelo aleatório — pesos pré-treinados
#   combinados com um MLP novo dão previsões confiantes e erradas —, mas em poucos passos o
#   modelo transferido passa o do zero. O relatório mostra exatamente o que foi reaproveitado.
# - **Upcycling** começa exatamente onde o denso estava. E no início *continua* igual a ele: com
#   especialistas idênticos a saída não depende das portas, então o roteador não recebe
#   gradiente da entropia cruzada (só das losses auxiliares); os especialistas só se afastam porque
#   cada um recebe o gradiente dos *seus* tokens. Com mais passos (ou `noise_std > 0`, que quebra a
#   simetria desde o início) eles podem se especializar e o MoE descer mais rápido por passo, como
#   no artigo do *upcycling* (em 30 passos, aqui, ainda não: a tabela abaixo) — ao custo de
#   E vezes os parâmetros do MLP e ~k vezes a sua computação.
#
# ### Resultados registrados neste notebook
#
# As saídas acima vêm da configuração **`--tiny` numa CPU de 2 núcleos** (x86_64, PyTorch 2.15, 1
# thread, com outro processo de 1 thread no outro núcleo; o notebook inteiro levou 2,7 min),
# sem GPU e sem acesso ao Hugging Face Hub, com o **substituto** — um GPT-2 de 2 camadas e 64
# dimensões pré-treinado aqui por 100 passos em TinyShakespeare —, **não** do GPT-2 da OpenAI.
# Cada treino: 60 passos de 4 × 64 tokens (15 360 tokens; *upcycling*: 30 passos), taxa 1e-3,
# mesma semente e mesmos lotes; loss de validação em 4 lotes fixos:
#
# | execução | val. no passo 0 | val. no fim | perplexidade no fim |
# |---|---:|---:|---:|
# | GPT-2 (substituto) pré-treinado | 9,472 | 7,530 | 1 864 |
# | GPT-2 do zero | 10,837 | 8,095 | 3 277 |
# | moderno, transferência parcial | 12,295 | 7,793 | 2 423 |
# | moderno do zero | 10,838 | 8,308 | 4 056 |
# | MoE por upcycling (4 especialistas, top-2) | 7,793 | 7,142 | 1 264 |
# | denso continuado | 7,793 | 7,139 | 1 260 |
#
# Mesmo um pré-treino de segundos, em outra língua, dá ~0,56 nat de vantagem depois de 60 passos,
# e a transferência parcial ~0,52 nat sobre o moderno do zero (uma semente só: a ordem de grandeza
# vale, a diferença entre os dois ganhos não foi medida contra a variação entre sementes). Em 30
# passos o MoE ainda não se separou do denso (7,142 contra 7,139; nem com a simetria quebrada por
# `noise_std`: exercício 3). Numa T4 com os pesos reais (`--full`, o padrão quando há GPU CUDA) os
# números serão outros: não medidos ainda — rode e compare.

# %% [markdown]
# ## Exercícios
#
# Preveja antes de abrir a resposta. As respostas foram medidas na configuração `--tiny` deste
# capítulo (o substituto de 2 camadas e 64 dimensões pré-treinado 100 passos em TinyShakespeare;
# lotes de 4 × 64 tokens, taxa 1e-3, semente 1337), 1 thread, numa CPU de 2 núcleos compartilhada.
#
# **1. Ajuste fino com o corpo congelado.** Congele os blocos (`requires_grad_(False)` em
# `model.transformer.h`) e treine só os embeddings e a norma final; depois, o contrário: congele os
# embeddings e treine só os blocos. Quanto cada um perde para o ajuste fino completo em 60 passos?
#
# ```python
# model = GPT(c); model.load_state_dict(pretrained_state)  # c: the GPT-2 config (section 3)
# for name, p in model.named_parameters():
#     if name.startswith("transformer.h."):  # ou "transformer.w" para congelar os embeddings
#         p.requires_grad_(False)
# train_run(model, train_ids, val_ids, args.lr_finetune, args.steps, "corpo congelado")
# ```
#
# <details><summary>Resposta</summary>
#
# Congelar o corpo quase não custa: 7,5588 contra 7,5303 do ajuste fino completo (+0,03 nat).
# Congelar os embeddings quase impede o aprendizado: 9,4003, perto do ponto de partida (9,4715). No
# substituto minúsculo, 97% dos parâmetros (3 232 832 de 3 332 928) estão nos embeddings: a tabela
# de tokens, 50 257 × 64, que é também a camada de saída (pesos compartilhados), e a de posições,
# 256 × 64. É na de tokens que o modelo aprende quais tokens são
# comuns em português, e os blocos e a norma final (100 096 parâmetros) sozinhos não chegam lá em
# 60 passos. Num GPT-2 de verdade os blocos têm 85 milhões dos 124 milhões de parâmetros, e o
# resultado pode ser outro: não medido aqui.
#
# </details>
#
# **2. *Upcycling* com top-1.** Com `--moe_top_k=1`, o MoE recém-criado ainda calcula os mesmos logits
# do modelo denso no passo 0?
#
# <details><summary>Resposta</summary>
#
# Não. Com top-1 a porta é a probabilidade crua do roteador ($g = p_i < 1$; renormalizar daria
# $g = 1$ e deixaria o roteador sem gradiente, capítulo 03), então a saída de cada MLP sai
# multiplicada por $p_i$. Na frase "Capitu tinha olhos de ressaca.", com o modelo moderno
# transferido e ajustado 60 passos, a maior diferença de logits no passo 0 foi 0,19 com top-1,
# contra 1,9e-6 (arredondamento) com top-2 (a saída da seção 4). Por isso o *upcycling* deste capítulo usa top-2.
#
# </details>
#
# **3. Quebrar a simetria.** Com especialistas idênticos, o roteador não recebe gradiente da entropia
# cruzada. Com `--noise_std=0.01` (cada cópia ganha um ruído de 1% do desvio dos pesos), o passo 0
# continua igual ao denso? E em 30 passos o MoE se separa do denso?
#
# <details><summary>Resposta</summary>
#
# No passo 0 o ruído quase não muda nada: diferença máxima de logits de 3,6e-4 (contra 1,9e-6 sem
# ruído). Em 30 passos também não: validação 7,1395 com ruído contra 7,1389 do denso continuado na
# mesma execução (`docs/results/05/exercicios.md`, nanomoe 0.2.1; o denso dá lá o mesmo 7,1389 que
# aqui); sem ruído, na execução gravada acima, 7,1421
# contra 7,1389: diferenças de milésimos. Quebrar a simetria deixa o roteador aprender, mas 30 passos
# de 4 × 64 tokens são pouco para os especialistas se separarem; o ganho do MoE, se vier, aparece
# com mais passos (não medido aqui).
#
# </details>

# %% [markdown]
# ## O que você aprendeu
#
# - Carregar pesos de outra implementação é provar, não confiar: cópia estrita de nomes e formas,
#   `Conv1D` transposto, e os logits comparados com os do `transformers` na mesma entrada.
# - Pesos pré-treinados, mesmo de outra língua, começam muito à frente de um modelo do zero.
# - A transferência parcial reaproveita o que tem o mesmo papel (embeddings, atenção, ganhos das
#   normas; k/v pela média do grupo, como no GQA) e diz, tensor a tensor, o que fez.
# - *Upcycling*: com top-2 ou mais, o MoE começa calculando o mesmo que o denso; com top-1, não.
# - `export_hf` escreve uma pasta que o ecossistema Hugging Face abre (GPT-2, Llama ou Mixtral).
#
# **Para ler.** Radford et al. 2019, [*GPT-2*](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
# (relatório da OpenAI, sem versão no arXiv); Komatsuzaki et al. 2022,
# [*Sparse Upcycling*](https://arxiv.org/abs/2212.05055); Ainslie et al. 2023, [*GQA*](https://arxiv.org/abs/2305.13245)
# (seção 2.2: k/v de um modelo MHA pela média do grupo); Jiang et al. 2024,
# [*Mixtral of Experts*](https://arxiv.org/abs/2401.04088); Touvron et al. 2023,
# [*LLaMA*](https://arxiv.org/abs/2302.13971). O carregamento do GPT-2 segue o `from_pretrained` do
# [nanoGPT](https://github.com/karpathy/nanoGPT). Termos: [glossário](../docs/glossario.md).
