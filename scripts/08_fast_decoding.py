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
# # Capítulo 08 — Decodificação rápida: o limite da memória e o que um MoE muda na inferência
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/08_fast_decoding.ipynb)
#
# O capítulo 02 ensinou o KV cache e parou ali. A pergunta seguinte é física: **quão rápido um
# modelo pode gerar texto?** Com lote 1, cada token novo multiplica *um* vetor por *todas* as
# matrizes de peso que usa. São 2 FLOPs por peso lido — muito menos do que o processador calcula
# por byte que consegue trazer da memória. O passo de decodificação espera pela memória, não pela
# conta, e então
#
# $$\text{tokens/s} \;\le\; \frac{\text{banda da memória (bytes/s)}}{\text{bytes lidos por passo}}
# \times \text{lote}$$
#
# É o **roofline** (Williams, Waterman & Patterson 2009,
# [*Roofline: an insightful visual performance model for multicore
# architectures*](https://doi.org/10.1145/1498765.1498785), Communications of the ACM):
# abaixo de uma certa intensidade aritmética (FLOPs por byte), o teto é a banda. Este capítulo
# mede esse teto na sua máquina e tenta chegar perto dele, uma peça de cada vez:
#
# 1. uma **sonda de banda** em PyTorch e a conta dos **bytes por token** do modelo;
# 2. um **KV cache estático** (posição como tensor, formas fixas) e um passo de decodificação que o
#    `torch.compile` captura inteiro (na GPU, como um *CUDA graph*) — a receita do gpt-fast
#    (equipe do PyTorch, [post no blog](https://pytorch.org/blog/accelerating-generative-ai-2/) e
#    [repositório](https://github.com/pytorch-labs/gpt-fast));
# 3. **pesos em bf16** e **pesos int8** com uma escala por canal de saída (menos bytes por peso), e
#    quanto isso custa em qualidade num modelo treinado;
# 4. **o lote**: quando o modelo deixa de esperar pela memória e passa a esperar pela conta;
# 5. **o MoE na inferência**: com lote 1 um MoE lê só os top-k especialistas por camada, quase os
#    mesmos bytes que o seu gêmeo denso de mesmos parâmetros ativos (o despacho dos tokens custa
#    tempo à parte); com lotes maiores, a união dos especialistas tocados cresce até todos.
#
# Cada peça é escrita do zero numa célula e conferida contra a do pacote (`nanomoe/static_cache.py`,
# `nanomoe/quantize.py`, `nanomoe/course/roofline.py`). Os testes estão em `tests/test_08_decode.py`, e as
# razões de velocidade medidas lado a lado no benchmark `scripts/bench_08_decode.py`
# (`docs/benchmarks.md`).

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

from nanomoe.course.notebook import setup, show_source

device = setup("08", written_for=NANOMOE_REF)

# %%
import copy
import os
import platform
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from nanomoe import GPT, get_tokenizer, gpt2_config, modern_config, moe_config
from nanomoe.course.plots import save_figure
from nanomoe.course.roofline import (
    ExpertCounter,
    decode_bytes,
    expected_experts,
    measure_bandwidth,
    roofline_limit,
)
from nanomoe.data import encode_splits, read_corpus
from nanomoe.quantize import (
    int8_error_bound,
    int8_matmul,
    int8_path,
    load_quantized,
    quantize_int8,
    quantize_model_int8,
    save_quantized,
)
from nanomoe.static_cache import MatvecLinear, compile_step, new_static_cache, static_generate, use_matvec_linears
from nanomoe.training.cli import parse_args
from nanomoe.training.train import TrainConfig, train

# %% [markdown]
# ## Parâmetros
#
# Execução de referência: ~2 min de relógio numa CPU de 2 núcleos compartilhada, com carga
# média ~1 (1 thread); com a máquina mais disputada (carga 6–9) levou 5–6 min. Numa GPU, não medido
# ainda. Como script:
# `uv run -m scripts.08_fast_decoding`; `--quick` roda tudo em segundos (é o que os testes usam).
# A forma "grande" é a do GPT-2 124M (12 camadas, C = 768, vocabulário 50 257) com pesos
# aleatórios: a velocidade não depende do valor dos pesos, só de quantos bytes eles ocupam.

# %%
DEFAULTS = dict(
    quick=False,
    corpus="machado",
    source="",  # a local copy of the corpus (a folder of .txt files) when offline
    # the small character model we train, then quantize (quality of int8)
    n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, steps=300, lr=2e-3,
    agree_tokens=300,  # greedy agreement over this many tokens
    # the big shape for speed (GPT-2 124M), random weights
    big_layer=12, big_head=12, big_embd=768, big_vocab=50257,
    new_tokens=16,  # tokens generated per timed run
    rounds=3,  # alternating rounds of each timing
    batches="1,2,4,8,16,32,64",
    compile=True,  # compile the small model's decode step (tens of seconds on a CPU)
    seed=1337,
    out_dir="runs/08",
    threads=1,
)
QUICK = dict(n_layer=1, n_embd=32, block_size=64, batch_size=4, steps=20, agree_tokens=30, big_layer=2,
             big_head=4, big_embd=64, big_vocab=512, new_tokens=4, rounds=1, batches="1,4,16", compile=False)
args = parse_args(DEFAULTS, quick=QUICK)
out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(args.threads)
T_START = time.perf_counter()
print(args)
print(f"{platform.machine()}, {os.cpu_count()} núcleos, {torch.get_num_threads()} thread(s) do torch, "
      f"carga média {os.getloadavg()[0]:.1f}")

# %% [markdown]
# ## 1. A banda: quantos bytes por segundo a memória entrega
#
# Somar um vetor grande é o programa mais simples que só espera pela memória: cada float é lido uma
# vez e custa uma soma. Com um buffer muito maior que os caches do processador (256 MiB), o tempo
# de `x.sum()` é o tempo de trazer os bytes da RAM — com 1 thread, a banda que um núcleo consegue
# puxar, que é a que os passos medidos abaixo (também com 1 thread) têm. Escrevemos a sonda e
# comparamos com a do pacote.

# %%
def my_bandwidth(megabytes: int = 256, reps: int = 5) -> float:
    x = torch.ones(megabytes * 2**20 // 4)  # float32: 4 bytes each
    x.sum()  # first touch: the pages get mapped
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best.append(time.perf_counter() - t0)
    return x.numel() * 4 / sorted(best)[len(best) // 2]  # median


bw_mine, bw = my_bandwidth(), measure_bandwidth()
print(f"banda de leitura: {bw_mine / 1e9:.1f} GB/s (nossa sonda), {bw / 1e9:.1f} GB/s (nanomoe.course.roofline)")

# %% [markdown]
# Numa máquina compartilhada as duas medidas variam de uma execução para outra (outros processos
# disputam a mesma memória); o que importa é a ordem de grandeza, e usamos a do pacote daqui em
# diante. Uma GPU entrega muito mais: a ficha técnica da NVIDIA anuncia mais de 3 TB/s para a H100
# SXM, mais de cem vezes os 24,5 GB/s medidos acima. A conta abaixo é a mesma.
#
# ## 2. Bytes por token
#
# Num passo de decodificação com lote 1, o modelo lê:
#
# - todos os pesos dos blocos (atenção, MLP, normas) e a norma final, uma vez;
# - a cabeça de saída (V × C). Com **embeddings amarrados** a mesma matriz é a tabela de tokens, e
#   a consulta da entrada lê só **uma linha** dela — a matriz é lida uma vez, como cabeça;
# - uma linha da tabela de posições (GPT-2) ou das tabelas do RoPE;
# - o KV cache: chaves e valores das posições já vistas.
#
# Contamos à mão, pela fórmula das formas do GPT-2, e conferimos com `decode_bytes`.

# %%
big_shape = dict(vocab_size=args.big_vocab, block_size=1024, n_layer=args.big_layer, n_head=args.big_head,
                 n_embd=args.big_embd)
torch.manual_seed(0)
big = GPT(gpt2_config(**big_shape)).eval()


def my_bytes_per_token(L: int, C: int, V: int, elt: int = 4) -> int:
    per_layer = (2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (2 * C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    #            ln_1       c_attn (q, k, v)      attn c_proj   ln_2      mlp c_fc              mlp c_proj
    weights = L * per_layer + 2 * C + V * C  # + ln_f + the tied head (read once)
    rows = C + C  # one row of wte (the token) and one of wpe (the position)
    return (weights + rows) * elt


mine = my_bytes_per_token(args.big_layer, args.big_embd, args.big_vocab)
pkg = decode_bytes(big, batch=1)
assert mine == pkg["total"], (mine, pkg)
print(f"bytes por token (fp32, sem o KV cache): {mine / 1e6:.1f} MB = nanomoe.course.roofline.decode_bytes")
print(f"  dos quais a cabeça/embedding: {args.big_vocab * args.big_embd * 4 / 1e6:.1f} MB")
kv_1024 = decode_bytes(big, 1, kv_positions=1024)["kv"]
print(f"KV cache lido num passo com 1024 posições: {kv_1024 / 1e6:.1f} MB")
print(f"limite com {bw / 1e9:.1f} GB/s: {roofline_limit(bw, mine):.1f} tokens/s em fp32")

# %% [markdown]
# O KV cache só pesa com contextos longos: aqui, com as posições curtas que geramos, ele é uma
# fração mínima dos bytes (nas contas abaixo ele entra com o tamanho do buffer usado).
#
# ## 3. O KV cache estático
#
# O cache do capítulo 02 já é pré-alocado, mas a posição de escrita é um `int` do Python: a cada
# passo o modelo recebe um número diferente, e um modelo compilado ou recompila ou trata a posição
# como tamanho dinâmico. Com a posição como **tensor**, todo passo é o mesmo grafo sobre os mesmos
# buffers:
#
# - escrever: `k_buf.index_copy_(2, input_pos, k)` (a dimensão 2 é a das posições);
# - máscara: a consulta na posição p vê a chave j se e só se j ≤ p — uma comparação de tensores;
# - RoPE: as linhas `rope_cos[input_pos]`, um *gather*, não um fatiamento por `int`.
#
# Escrevemos um passo de atenção com esse cache e conferimos contra a atenção com o cache do
# capítulo 02; depois, a geração inteira do pacote contra as duas gerações do capítulo 02.

# %%
def my_static_attend(q, k_new, v_new, k_buf, v_buf, input_pos):
    """q, k_new, v_new (B, H, T, D) at positions input_pos (T,); k_buf, v_buf (B, H, max_len, D)."""
    k_buf.index_copy_(2, input_pos, k_new)
    v_buf.index_copy_(2, input_pos, v_new)
    mask = torch.arange(k_buf.size(2)).unsqueeze(0) <= input_pos.unsqueeze(1)  # (T, max_len)
    return F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask)


g = torch.Generator().manual_seed(0)
B, H, D, S = 2, 4, 16, 10
k_buf, v_buf = torch.zeros(B, H, S, D), torch.zeros(B, H, S, D)
ks, vs, qs = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
outs = [my_static_attend(qs[:, :, :3], ks[:, :, :3], vs[:, :, :3], k_buf, v_buf, torch.arange(3))]  # prefill
for t in range(3, S):  # decode: one position at a time
    outs.append(my_static_attend(qs[:, :, t:t + 1], ks[:, :, t:t + 1], vs[:, :, t:t + 1], k_buf, v_buf,
                                 torch.tensor([t])))
causal = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # no cache at all
torch.testing.assert_close(torch.cat(outs, 2), causal, atol=1e-5, rtol=1e-5)
print("nossa atenção com cache estático = atenção causal sem cache")

# %% [markdown]
# ## 4. Um modelo treinado do curso
#
# Para medir a qualidade da quantização precisamos de pesos que signifiquem algo. Treinamos o
# modelo moderno pequeno dos capítulos 02/03 (4 camadas, C = 128, caracteres) no Machado de Assis,
# como o capítulo 02 faz, e o salvamos em `runs/08` — é um checkpoint de verdade, que o
# `scripts.generate` abre.

# %%
text = read_corpus(args.corpus, source=args.source or None)
if args.quick:
    text = text[:200_000]
tok = get_tokenizer("char", text=text)
train_ids, val_ids = encode_splits(tok, text)
small_cfg = modern_config(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)
tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                   warmup_steps=max(1, args.steps // 10), eval_interval=args.steps, eval_iters=10,
                   seed=args.seed, device="cpu", dtype="float32", sample_tokens=0, out_dir=str(out_dir),
                   plot=False, threads=args.threads)
torch.manual_seed(args.seed)
small = GPT(small_cfg)
t0 = time.perf_counter()
res = train(small, train_ids, val_ids, tcfg, tokenizer=tok, progress=False)
small.eval()
print(f"treino: {args.steps} passos em {time.perf_counter() - t0:.0f} s, loss de validação "
      f"{res.final['val_loss']:.3f}, {small.num_params(non_embedding=False) / 1e6:.2f}M parâmetros")

# %%
prompt_ids = torch.tensor([tok.encode("Capitu olhou para mim")])
n_new = min(args.agree_tokens, args.block_size - prompt_ids.size(1))
ref = small.generate(prompt_ids, n_new, temperature=0)  # chapter 02's cache
assert torch.equal(static_generate(small, prompt_ids, n_new), ref)  # the package's static cache
assert torch.equal(small.generate(prompt_ids, n_new, temperature=0, use_cache=False), ref)  # no cache
print(f"{n_new} tokens gulosos: cache estático = cache do capítulo 02 = sem cache")
print(repr(tok.decode(ref[0].tolist())[:160]))

# %% [markdown]
# ### O passo compilado
#
# `compile_step` entrega o passo de um token ao `torch.compile` (na GPU, no modo
# `"reduce-overhead"`, que grava o passo como um CUDA graph e o repete com um só lançamento). A
# primeira chamada compila (compilação e primeira geração: 2 s na execução de referência, com o cache de compilação do
# PyTorch já preenchido por execuções anteriores; a primeira vez leva mais); as
# seguintes reusam o mesmo grafo,
# porque as formas nunca mudam. Conferimos que os tokens são os mesmos e medimos os dois.

# %%
def tokens_per_s(fn, n_tokens: int, rounds: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return n_tokens / sorted(ts)[len(ts) // 2]


if args.compile:
    step = compile_step("cpu")
    cache = new_static_cache(small, 1, prompt_ids.size(1) + n_new)
    t0 = time.perf_counter()
    compiled = static_generate(small, prompt_ids, n_new, cache=cache, step=step)
    print(f"compilação + primeira geração: {time.perf_counter() - t0:.0f} s")
    assert torch.equal(compiled, ref)
    eager_tps = tokens_per_s(lambda: static_generate(small, prompt_ids, n_new), n_new, args.rounds)
    comp_tps = tokens_per_s(lambda: static_generate(small, prompt_ids, n_new, cache=cache, step=step), n_new,
                            args.rounds)
    print(f"modelo pequeno, {n_new} tokens: eager {eager_tps:.0f} tokens/s, compilado {comp_tps:.0f} tokens/s "
          f"({comp_tps / eager_tps:.2f}x), mesmos tokens")

# %% [markdown]
# No modelo pequeno (0,72 milhão de parâmetros, 2,9 MB de pesos em fp32, cabe no cache L3 de 32 MiB da CPU
# de referência) o passo não espera pela RAM: espera pelo Python e pelos lançamentos de dezenas de
# operações pequenas, e é isso que a compilação corta (2,81× acima). No modelo grande, na CPU, o
# passo espera pela memória, e compilar o passo como ele é não ajuda: no benchmark
# (`scripts/bench_08_decode.py`, que mede eager e compilado lado a lado; `docs/benchmarks.md`) o
# passo compilado deu 22,3 tokens/s contra 23,0 do eager em fp32, porque o tempo está nas chamadas
# do BLAS, que a compilação deixa como estão. O que ajuda é mudar a conta que o compilador vê (a
# próxima subseção). Na GPU, onde cada lançamento custa microssegundos e um passo tem centenas deles,
# os CUDA graphs são o que o gpt-fast mostra valer a pena (não medido ainda aqui).
#
# O texto guloso acima entra em laço: um modelo de caracteres pequeno, com loss de validação ~2,0,
# faz isso. Por isso a qualidade da quantização, mais abaixo, é medida também em posições de texto
# real.
#
# ### O produto matriz-vetor como redução
#
# Com lote 1, cada `nn.Linear` do passo é um produto matriz-vetor, $y_o = \sum_i W_{oi}\, x_i$: 2
# FLOPs por peso lido. A chamada de BLAS que o `nn.Linear` faz (o MKL, na CPU) foi feita para
# matriz × matriz; com um vetor só, ela lê a matriz `(out, in)` abaixo da banda (a seção 6 mede).
# Escrito como o que é — multiplicar elemento a elemento e somar ao longo de `in` — o produto vira,
# dentro do `torch.compile`, um laço vetorizado que o compilador (o *inductor*) gera e que lê cada
# peso uma vez, em ordem. É o que `MatvecLinear` faz: fora da compilação é um `nn.Linear` comum;
# dentro dela, com uma linha só, em fp32 ou bf16 e na CPU, devolve a redução (somada em fp32). Com
# pesos int8 e ativações fp32, o mesmo laço converte cada byte em float dentro da soma
# (`Int8Linear`), sem escrever uma cópia desquantizada.
#
# Um detalhe do compilador decide o resultado: por padrão o inductor embute uma conta barata (a
# normalização da LayerNorm, a GELU) dentro do laço que a consome, e num produto matriz-vetor isso
# refaria essa conta, sobre o vetor inteiro, para **cada linha** de saída. Por isso `compile_step`,
# na CPU, pede que cada resultado intermediário seja guardado uma vez
# (`realize_opcount_threshold=0`): num vetor de 768 números, guardar não custa nada. Na GPU, o
# próprio inductor reescreve um produto
# matriz-vetor como redução quando o ajuste por descida coordenada (`coordinate_descent_tuning`, que
# o gpt-fast liga) está ativo. Escrevemos a redução à mão e conferimos contra o `nn.Linear` e contra
# o passo compilado do pacote:

# %%
W = small.lm_head.weight.detach()  # (V, C): the tied embedding, read as the output head
v = torch.randn(1, W.size(1), generator=g)
my_matvec = (v.unsqueeze(-2) * W).sum(-1)  # (1, 1, C) * (V, C) -> (1, V): y_o = sum_i W_oi v_i
torch.testing.assert_close(my_matvec, F.linear(v, W))
mv_small = use_matvec_linears(copy.deepcopy(small))  # every nn.Linear -> MatvecLinear, same tensors
assert isinstance(mv_small.lm_head, MatvecLinear) and mv_small.lm_head.weight is mv_small.transformer.wte.weight
if args.compile:
    mv_tokens = static_generate(mv_small, prompt_ids, n_new, step=compile_step("cpu"))
    assert torch.equal(mv_tokens, ref)
    print(f"redução à mão = F.linear; passo compilado com MatvecLinear: os mesmos {n_new} tokens gulosos")
show_source(MatvecLinear)

# %% [markdown]
# ## 5. Menos bytes por peso: bf16 e int8
#
# Se o tempo é de bytes, guardar cada peso em menos bytes é o ganho direto. bf16 usa 2 bytes. int8
# usa 1, com uma **escala por canal de saída** (uma por linha de W, simétrica):
#
# $$s_o = \frac{\max_i |W_{oi}|}{127}, \qquad W8_{oi} = \mathrm{round}(W_{oi}/s_o) \in [-127, 127],
# \qquad y_o = s_o \sum_i W8_{oi}\, x_i$$
#
# Cada peso erra no máximo $s_o/2$, então $|y_o - \hat y_o| \le \frac{s_o}{2}\sum_i |x_i|$. As
# ativações continuam em ponto flutuante ("*weight-only*"); quantizar também as ativações é a
# parte difícil (Dettmers et al. 2022, [LLM.int8()](https://arxiv.org/abs/2208.07339)). Escrevemos
# a quantização e conferimos, bit a bit, contra a do pacote; e o produto contra o limite de erro.

# %%
def my_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


w = small.transformer.h[0].mlp.c_fc.weight.detach()
w8, s = my_quantize(w)
w8_pkg, s_pkg = quantize_int8(w)
assert torch.equal(w8, w8_pkg) and torch.equal(s, s_pkg)
x = torch.randn(8, w.size(1), generator=g)
err = (int8_matmul(x, w8, s) - x @ w.t()).abs()
bound = int8_error_bound(x, s)
assert (err <= bound + 1e-5).all()
print(f"nossa quantização = nanomoe.quantize; erro do produto: máx {err.max():.2e}, limite {bound.max():.2e} "
      f"(o erro típico fica {float((err / bound).mean()):.0%} do limite: os arredondamentos se cancelam)")
print(f"kernels int8 nesta máquina: fp32 -> {int8_path('cpu', torch.float32)}, bf16 -> "
      f"{int8_path('cpu', torch.bfloat16)}")

# %% [markdown]
# Na CPU, o kernel int8 do PyTorch (`torch._weight_int8pack_mm`) é bem mais rápido com ativações
# bf16 do que com fp32 (a docstring de `int8_path` traz a medida); por isso a variante "int8" deste
# capítulo guarda os pesos em int8 e calcula em bf16, como o gpt-fast faz na GPU. Com ativações fp32
# (e onde o kernel não existe), o pacote desquantiza a matriz e multiplica.
#
# ### Qualidade: concordância gulosa e perplexidade
#
# Duas medidas no modelo treinado: (a) **concordância gulosa** — seguimos a continuação gulosa do
# modelo fp32 e, em cada posição, perguntamos se o modelo quantizado escolheria o mesmo próximo
# token com o mesmo prefixo; o mesmo nas posições de texto real de validação (o argmax de cada
# variante contra o do fp32); (b) a **perplexidade de validação** nessas mesmas janelas fixas.

# %%
def variants(model: GPT) -> dict[str, GPT]:
    b16 = copy.deepcopy(model).to(torch.bfloat16)
    if hasattr(b16, "rope_cos"):  # RoPE tables stay fp32, as nanomoe.interop.inference does
        b16.rope_cos, b16.rope_sin = b16.rope_cos.float(), b16.rope_sin.float()
    i8 = quantize_model_int8(copy.deepcopy(b16))  # int8 weights, bf16 activations
    i8_32 = quantize_model_int8(copy.deepcopy(model))  # int8 weights, fp32 activations
    return {"fp32": model, "bf16": b16, "int8 (ativações bf16)": i8, "int8 (ativações fp32)": i8_32}


@torch.no_grad()
def val_loss(model: GPT, batches: int = 8) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy on fixed validation windows, and the argmax at every position."""
    T = min(128, model.config.block_size)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(val_ids) - T - 1, (batches, 4), generator=gen)
    data = torch.as_tensor(val_ids, dtype=torch.long)
    losses, top1 = [], []
    for row in starts:
        xb = torch.stack([data[i:i + T] for i in row])
        yb = torch.stack([data[i + 1:i + T + 1] for i in row])
        logits, _ = model(xb)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), yb.flatten()).item())
        top1.append(logits.argmax(-1))
    return sum(losses) / len(losses), torch.cat(top1)


@torch.no_grad()
def agreement(model: GPT, seq: torch.Tensor, start: int) -> float:
    """Fraction of positions >= start where model's argmax = the next token of seq (fp32's greedy run)."""
    logits, _ = model(seq[:, :-1])
    return (logits[:, start - 1:].argmax(-1) == seq[:, start:]).float().mean().item()


quality = {}
base_loss, base_top1 = val_loss(small)
for name, m in variants(small).items():
    vl, top1 = val_loss(m)
    quality[name] = dict(agree=agreement(m, ref, prompt_ids.size(1)), val_loss=vl,
                         val_agree=(top1 == base_top1).float().mean().item(),
                         ppl_change=float(torch.exp(torch.tensor(vl - base_loss))) - 1)
    print(f"{name:22s} concordância gulosa {quality[name]['agree']:.1%} em {n_new} tokens gerados, "
          f"{quality[name]['val_agree']:.1%} em {base_top1.numel():,} posições de validação; "
          f"loss de validação {vl:.4f}, perplexidade {quality[name]['ppl_change']:+.2%}")

# %% [markdown]
# ### Checkpoints quantizados
#
# `save_quantized` grava a configuração, o formato e o `state_dict` (int8 + escalas; a matriz
# amarrada uma vez só); `load_quantized` lê com `weights_only=True` (nenhum código roda ao abrir o
# arquivo) e devolve um modelo que gera os mesmos tokens.

# %%
q32 = quantize_model_int8(copy.deepcopy(small))
save_quantized(q32, out_dir / "int8.pt")
torch.save(small.state_dict(), out_dir / "fp32_state.pt")
back = load_quantized(out_dir / "int8.pt")
assert torch.equal(static_generate(back, prompt_ids, 40), static_generate(q32, prompt_ids, 40))
mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
print(f"arquivo fp32: {mb(out_dir / 'fp32_state.pt'):.2f} MB, int8: {mb(out_dir / 'int8.pt'):.2f} MB; "
      f"recarregado gera os mesmos tokens")

# %% [markdown]
# O mesmo, pela linha de comando (o checkpoint do treino acima está em `runs/08/`): o script diz na
# primeira linha o que escolheu — cache estático (o padrão em todo dispositivo), int8 ligado ou não.

# %%
cmd = [sys.executable, "-m", "scripts.generate", str(out_dir), "Capitu", "--int8", "--dtype=bfloat16",
       "--temperature=0", "--max_new_tokens=60", "--device=cpu", "--threads=1"]
if Path("scripts/generate.py").is_file():  # from the repository (Colab without it: skip)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stderr.strip().splitlines()[0])
    print(r.stdout.strip())

# %% [markdown]
# ## 6. Limite e velocidade de cada variante, na forma do GPT-2 124M
#
# Agora a forma grande. Para cada variante: os bytes que um passo lê (`decode_bytes`), o limite
# banda ÷ bytes, e os tokens/s medidos — as variantes se alternam rodada a rodada, para que a carga
# da máquina pese igual em todas.

# %%
idx_big = torch.randint(0, args.big_vocab, (1, 8), generator=torch.Generator().manual_seed(1))
n = args.new_tokens
big_vars = variants(big)
runs = {
    "fp32, cache do cap. 02": (lambda: big.generate(idx_big, n, temperature=0), big),
    "fp32, cache estático": (lambda: static_generate(big, idx_big, n), big),
    "bf16, cache estático": (lambda: static_generate(big_vars["bf16"], idx_big, n), big_vars["bf16"]),
    "int8 (ativ. bf16), cache estático": (lambda: static_generate(big_vars["int8 (ativações bf16)"], idx_big, n),
                                          big_vars["int8 (ativações bf16)"]),
}
if args.compile:  # the one-token step compiled, each Linear a reduction (fp32; int8 with fp32 activations)
    for name, m in (("fp32, compilado (reduções)", use_matvec_linears(copy.deepcopy(big))),
                    ("int8 (ativ. fp32), compilado", big_vars["int8 (ativações fp32)"])):
        step, cache = compile_step("cpu"), new_static_cache(m, 1, 8 + n)
        runs[name] = (lambda m=m, step=step, cache=cache: static_generate(m, idx_big, n, cache=cache, step=step), m)
times, bws = {k: [] for k in runs}, []
with torch.no_grad():
    for f, _ in runs.values():
        f()  # warm-up
    for _ in range(args.rounds):
        bws.append(measure_bandwidth(reps=3))  # the bandwidth under the same load as the runs
        for k, (f, _) in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
bw_runs = sorted(bws)[len(bws) // 2]
print(f"banda medida entre as rodadas: {bw_runs / 1e9:.1f} GB/s (mediana)")
speed = {}
for k, (_, m) in runs.items():
    tps = n / sorted(times[k])[len(times[k]) // 2]
    lim = roofline_limit(bw_runs, decode_bytes(m, 1, kv_positions=8 + n)["total"])
    speed[k] = dict(tps=tps, limit=lim, bytes=decode_bytes(m, 1, kv_positions=8 + n)["total"])
    print(f"{k:24s} {speed[k]['bytes'] / 1e6:7.1f} MB/passo  limite {lim:6.1f}  medido {tps:6.1f} tokens/s "
          f"({tps / lim:.0%} do limite)")
print(f"carga média durante a medida: {os.getloadavg()[0]:.1f}")

# %%
fig, ax = plt.subplots(figsize=(10, 4.2))
names = list(speed)
xs = range(len(names))
ax.bar([i - 0.2 for i in xs], [speed[k]["limit"] for k in names], width=0.4, label="limite (banda ÷ bytes)",
       color="#bbb")
ax.bar([i + 0.2 for i in xs], [speed[k]["tps"] for k in names], width=0.4, label="medido", color="#2a7")
for i, k in enumerate(names):
    ax.text(i + 0.2, speed[k]["tps"], f"{speed[k]['tps'] / speed[k]['limit']:.0%}", ha="center", va="bottom")
ax.set_xticks(list(xs), names, fontsize=8, rotation=12, ha="right")
ax.set_ylabel("tokens/s (lote 1)")
ax.set_title(f"GPT-2 124M (pesos aleatórios), CPU {platform.machine()}, {torch.get_num_threads()} thread: "
             f"banda {bw_runs / 1e9:.1f} GB/s".replace(".", ","), fontsize=9)
ax.legend()
save_figure(fig, out_dir / "roofline_variants.png")

# %% [markdown]
# Leia a figura pelas razões: o limite dobra de fp32 para bf16 e quase dobra de novo para int8,
# porque os bytes por passo caem na mesma proporção. A fração atingida depende de como cada produto
# matriz-vetor é feito. Sem compilar, o fp32 fica em 40% do limite: a chamada do MKL lê a matriz
# abaixo da banda (a cabeça, 50 257 × 768 guardada por linhas, a ~11–12 GB/s no benchmark). O
# passo compilado com as reduções lê perto da banda: 39,6 tokens/s, 70% do limite, ~1,7× o mesmo
# modelo sem compilar. O int8 compilado (ativações fp32) fica em 55,7 tokens/s, só 25% do seu
# limite, em boa parte por um motivo que a figura esconde: aqui são só 16 tokens novos, e o *prefill* do prompt
# (8 tokens) roda sem compilar — com ativações fp32 o pacote desquantiza e multiplica, o que custa
# tanto quanto uma dezena de passos. O passo sozinho, sem o prefill, leva ~12 ms no benchmark, ~3,5×
# menos que o passo fp32 sem compilar, mas ainda cerca do dobro dos ~6 ms que a banda permitiria
# (126 MB a 21 GB/s, a banda sondada naquela medida): mesmo sem o prefill, o int8 fica longe do
# limite. Com 32 tokens novos, o benchmark mede 3,26× o caminho fp32 padrão (o cache do
# capítulo 02). O int8 sem compilar, com ativações bf16 (o kernel `_weight_int8pack_mm`), fica em
# 20%. O benchmark (`scripts/bench_08_decode.py`, números em `docs/benchmarks.md`) repete esta medida com mais
# rodadas, com o `generate` do `transformers` ao lado e com o bf16 compilado com reduções (70% do
# limite).
#
# ## 7. O lote: de limitado pela memória a limitado pela conta
#
# Com lote B, um passo lê os mesmos pesos e produz B tokens: enquanto a memória manda, tokens/s
# cresce ~B vezes. Cada peso lido passa a render 2B FLOPs, e em algum B o processador vira o
# gargalo — a curva dobra. Medimos tokens/s × lote no modelo denso e no MoE, nas duas formas: a do
# capítulo 03 (4 camadas, C = 128) e a do GPT-2 124M com 8 especialistas top-2 em toda camada, cada
# uma com o seu **gêmeo denso** de mesmos parâmetros ativos. Contamos também quantos especialistas
# distintos cada camada MoE toca por passo.

# %%
batches = [int(b) for b in args.batches.split(",")]
shapes = {
    "cap. 03 (4 camadas, C=128)": dict(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "124M (12 camadas, C=768)": dict(big_shape),
}


@torch.no_grad()
def batch_sweep(model: GPT, steps: int) -> tuple[list[float], list[float]]:
    counter = ExpertCounter(model)
    tps, touched = [], []
    for b in batches:
        idx = torch.randint(0, model.config.vocab_size, (b, 4), generator=torch.Generator().manual_seed(b))
        static_generate(model, idx, 2)  # warm-up at this batch
        counter.reset()
        t0 = time.perf_counter()
        static_generate(model, idx, steps)
        tps.append(b * steps / (time.perf_counter() - t0))
        decode = counter.counts[model.config.n_layer:]  # the prefill's counts come first, one per layer
        touched.append(sum(decode) / max(1, len(decode)))
    counter.remove()
    return tps, touched


sweep = {}
for sname, shape in shapes.items():
    for kind, make in (("denso", modern_config), ("MoE 8 top-2", moe_config)):
        torch.manual_seed(0)
        m = GPT(make(**shape)).eval()
        t0 = time.perf_counter()
        tps, touched = batch_sweep(m, 4 if "124M" in sname else 8)
        sweep[(sname, kind)] = dict(tps=tps, touched=touched, limit1=roofline_limit(
            bw, decode_bytes(m, 1, experts=m.config.moe_top_k if m.config.n_experts else None)["total"]))
        print(f"{sname:28s} {kind:12s} " + "  ".join(f"B={b}: {t:,.0f}" for b, t in zip(batches, tps))
              + f" tokens/s ({time.perf_counter() - t0:.0f} s)")
        del m
print(f"carga média: {os.getloadavg()[0]:.1f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, sname in zip(axes, shapes):
    for kind, color in (("denso", "#27a"), ("MoE 8 top-2", "#d62")):
        r = sweep[(sname, kind)]
        ax.plot(batches, r["tps"], "o-", color=color, label=f"{kind}, medido")
        ax.plot(batches, [r["limit1"] * b for b in batches], ":", color=color,
                label=f"{kind}, banda ÷ bytes(lote 1) × B")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("lote B")
    ax.set_ylabel("tokens/s")
    ax.set_title(sname, fontsize=9)
    ax.legend(fontsize=7)
fig.suptitle(f"tokens/s × lote, cache estático, fp32, CPU {platform.machine()}, 1 thread", fontsize=10)
save_figure(fig, out_dir / "tokens_per_s_vs_batch.png")

# %% [markdown]
# A linha pontilhada é o que a memória permitiria se os bytes por passo não mudassem com o lote.
# Onde a curva medida se afasta dela, o passo deixou de ser limitado pela memória. Para o MoE, a
# linha pontilhada é otimista por mais um motivo: os bytes por passo *crescem* com o lote, porque mais tokens
# tocam mais especialistas. Quantos?

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for sname, marker in zip(shapes, ("o", "s")):
    ax.plot(batches, sweep[(sname, "MoE 8 top-2")]["touched"], marker + "-", label=f"medido, {sname}")
ax.plot(batches, [expected_experts(8, 2, b) for b in batches], "k:", label="sorteio uniforme: E(1-(1-k/E)^B)")
ax.axhline(8, color="#999", lw=0.8)
ax.set_xscale("log", base=2)
ax.set_xlabel("lote B")
ax.set_ylabel("especialistas distintos por camada e passo")
ax.set_title("MoE 8 especialistas top-2 (pesos aleatórios)", fontsize=9)
ax.legend(fontsize=7)
save_figure(fig, out_dir / "experts_touched_vs_batch.png")

# %%
for sname in shapes:
    d, m = sweep[(sname, "denso")], sweep[(sname, "MoE 8 top-2")]
    print(f"{sname}: MoE/denso em tokens/s — " + "  ".join(
        f"B={b}: {mt / dt:.2f}" for b, mt, dt in zip(batches, m["tps"], d["tps"])))
    print("   especialistas tocados: " + "  ".join(f"B={b}: {t:.1f}" for b, t in zip(batches, m["touched"])))

# %% [markdown]
# Com lote 1 cada camada toca exatamente 2 dos 8 especialistas: o MoE lê os mesmos bytes de
# especialistas que o gêmeo denso lê de MLP (por construção, k especialistas somam a largura do MLP
# denso), mais o roteador. Com lote 8 já são quase todos (7,5 e 7,4 medidos nas duas formas; o
# sorteio uniforme dá 7,2): nessa hora o MoE lê ~3,7× os bytes de MLP do denso, e a vantagem da
# inferência "barata" some — a não ser que o
# passo já esteja limitado pela conta, quando o MoE volta a custar o que os parâmetros *ativos*
# custam. É por isso que servir MoEs grandes usa lotes grandes e paralelismo de especialistas
# (capítulo 07). Com pesos aleatórios o roteador sorteia quase uniformemente; um roteador treinado
# não sorteia assim, e a curva muda com ele (não medido aqui).
#
# Um detalhe que a tabela acima mostra: com lote 1 o MoE não é mais rápido que o gêmeo denso, e na
# forma pequena é bem mais lento (0,98× os tokens/s do denso na forma 124M, quase o mesmo; 0,44× na
# forma pequena, onde o passo espera pelos lançamentos e não pela memória), porque o despacho
# (ordenar, juntar e espalhar os tokens, dois `grouped_mm`) custa operações pequenas que o MLP denso
# não tem. Cada ponto é uma medida curta (4
# passos na forma 124M); o benchmark, com mais rodadas, mediu na forma 124M 1,04× o tempo por token
# do denso.

# %%
print(f"tempo total do capítulo até aqui: {time.perf_counter() - T_START:.0f} s")

# %% [markdown]
# ## 8. Exercícios
#
# Preveja antes de abrir a resposta. As respostas vêm das saídas deste notebook na execução de
# referência (CPU de 2 núcleos compartilhada, 1 thread); na sua máquina os números absolutos serão
# outros, as razões devem ser parecidas.
#
# **1. Quanto da cabeça?** Na forma do GPT-2 124M em fp32, que fração dos bytes de um passo é a
# matriz de saída (= embedding amarrado)? E se os embeddings *não* fossem amarrados, quanto o passo
# leria a mais?
#
# <details><summary>Resposta</summary>
#
# A seção 2 imprime: 494,6 MB por passo, dos quais 154,4 MB (31%) são a cabeça. Sem amarrar, a
# tabela de entrada seria outra matriz do mesmo tamanho — mas a consulta lê só uma linha dela
# (3 KB), então o passo leria praticamente o mesmo. Amarrar economiza memória (154 MB), não banda.
#
# </details>
#
# **2. O lote que vira a curva.** Em que lote o modelo denso de 124M deixa de ganhar ~B× em
# tokens/s? Releia a saída da seção 7 e compare com a linha pontilhada.
#
# <details><summary>Resposta</summary>
#
# Veja a linha `124M ... denso` da seção 7. Na execução de referência, tokens/s cresceu ~4× de
# B = 1 a B = 8 (22 → 92, metade da proporção do lote, já com ruído: de B = 1 a B = 2 mudou pouco,
# 22 → 27) e só ~2,2× de B = 8 a B = 64 (92 → 205, com 8× mais tokens por passo): cada dobra do lote
# rendeu 1,7×, 1,4×, 1,3× e 1,2× em B = 8, 16, 32 e 64. A curva dobra por volta de B = 8 (e já
# crescia menos que B× antes): daí em diante cada peso lido alimenta 2B FLOPs, e a conta pesa cada
# vez mais que a leitura dos pesos. O ponto
# exato muda com a carga da máquina (cada ponto é uma medida curta), e numa GPU a virada vem muito
# mais tarde: ela faz centenas de FLOPs por byte lido.
#
# </details>
#
# **3. int8 sem bf16.** A seção 5 mediu duas variantes int8: com ativações bf16 e com ativações
# fp32. Qual concordou mais com o fp32, e qual seria mais rápida na CPU?
#
# <details><summary>Resposta</summary>
#
# A tabela da seção 5 responde a primeira: com ativações fp32, 99,1% na geração gulosa e 99,4% nas
# posições de validação; com ativações bf16, 98,3% e 98,9% (o bf16 sozinho dá 98,3% e 99,0%). A
# receita de quantização é a mesma nas duas, mas a variante bf16 quantiza os pesos já arredondados
# para bf16 e guarda as escalas em bf16; a diferença — 2 tokens em 235, meio ponto nas posições de
# validação, num só modelo — vem desses arredondamentos em bf16 (ativações, pesos e escalas; 7 bits
# de mantissa guardados, 8 de precisão). A segunda depende de compilar. Sem compilar, com ativações
# bf16 roda o kernel `_weight_int8pack_mm`, rápido na CPU; com ativações fp32 o mesmo kernel é
# muito mais lento (a docstring de `int8_path` traz
# a medida), e o pacote desquantiza e multiplica: lê 1 byte, escreve 4 e relê 4 por peso, mais
# tráfego que o próprio fp32, que só lê 4. Compilado, o passo de um token com ativações fp32 vira a
# redução com a conversão dentro do laço, que lê só o byte de cada peso: é a variante int8 mais
# rápida do benchmark (3,26× o caminho fp32 padrão) e, aqui, a que mais concorda com o fp32. Na
# seção 6 ela também é a int8 mais rápida (55,7 contra 44,7 tokens/s), mas em só 25% do
# seu limite, por causa do prefill sem compilar, que desquantiza.
#
# </details>
#
# **4. Quantos especialistas com lote 4?** Pela fórmula do sorteio uniforme, quantos dos 8
# especialistas uma camada toca com 4 tokens top-2? Compare com o medido.
#
# <details><summary>Resposta</summary>
#
# 8 × (1 − (6/8)⁴) = 8 × (1 − 81/256) ≈ 5,5. A seção 7 mediu 5,9 na forma do capítulo 03 e 5,6 na
# do GPT-2 124M (com pesos aleatórios o roteador é quase uniforme, então fica perto).
#
# </details>

# %% [markdown]
# ## O que você aprendeu
#
# - Gerar um token com lote 1 é ler todos os pesos uma vez: tokens/s ≤ banda ÷ bytes por passo. Você
#   mediu a banda com uma soma, contou os bytes à mão (a matriz amarrada conta uma vez, como cabeça)
#   e comparou o medido com o limite para cada variante.
# - O KV cache estático guarda a posição num tensor: todo passo tem as mesmas formas, e o
#   `torch.compile` (CUDA graphs na GPU) captura o passo inteiro. Gera os mesmos tokens que o
#   cache do capítulo 02 e que a geração sem cache.
# - Com lote 1, cada camada linear é um produto matriz-vetor. Escrito como redução dentro do
#   `torch.compile` (e com cada resultado intermediário guardado uma vez, para a normalização da
#   LayerNorm não ser refeita a cada linha de saída), ele lê os pesos perto da banda: 70% do limite
#   em fp32 aqui, contra 40% da chamada do BLAS; com pesos int8, a conversão entra no mesmo laço.
# - bf16 corta os bytes pela metade; int8 com uma escala por canal de saída, de novo pela metade,
#   com erro limitado por $s_o/2 \sum_i |x_i|$ e, no modelo treinado, concordância gulosa e
#   perplexidade medidas acima.
# - Com lote maior, os mesmos bytes rendem mais tokens até o processador virar o gargalo.
# - Um MoE com lote 1 lê só os top-k especialistas: quase os mesmos bytes que o gêmeo denso de
#   mesmos parâmetros ativos, mas o despacho custa tempo à parte (0,98× os tokens/s do denso na
#   forma 124M aqui, 1,04× o tempo por token no benchmark). Com lote maior a união dos
#   especialistas tocados cresce até todos, e os bytes
#   por passo com ela.
#
# **Para ler.** Williams, Waterman & Patterson 2009,
# [*Roofline: an insightful visual performance model for multicore
# architectures*](https://doi.org/10.1145/1498765.1498785); equipe do PyTorch, gpt-fast
# ([post](https://pytorch.org/blog/accelerating-generative-ai-2/),
# [código](https://github.com/pytorch-labs/gpt-fast)); Dettmers et al. 2022,
# [*LLM.int8()*](https://arxiv.org/abs/2208.07339); Pope et al. 2022,
# [*Efficiently Scaling Transformer Inference*](https://arxiv.org/abs/2211.05102) (a mesma conta de
# bytes e FLOPs para modelos grandes); llama.cpp ([repositório](https://github.com/ggml-org/llama.cpp)),
# a referência que muitos leitores usam para rodar modelos quantizados na CPU. Termos:
# [glossário](../docs/glossario.md).
