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
# # Capítulo 01 — Um nanoGPT que decora um parágrafo
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/01_train_nanogpt.ipynb)
#
# Antes de treinar um modelo de linguagem em milhões de tokens, vale um teste simples: **ele
# consegue decorar um único parágrafo?** Se a loss de um só exemplo não vai a quase zero, algo
# está quebrado (o modelo, a loss, os alvos ou o otimizador) e não adianta escalar.
#
# Neste capítulo pegamos o GPT-2 do nanoGPT (o `GPT` do pacote `nanomoe`, com a arquitetura do
# GPT-2: embeddings de posição aprendidos, LayerNorm antes de cada subcamada, atenção causal,
# MLP com GELU e pesos de entrada e saída compartilhados) em versão mini, e o treinamos num
# parágrafo em português. O roteiro segue o primeiro post da série *Do nanoGPT ao nanoMoE*:
#
# 1. tokenizar um único texto;
# 2. criar os alvos deslocando 1 token (a tarefa é prever o **próximo** token);
# 3. medir a loss e a perplexidade do modelo ainda aleatório;
# 4. treinar por algumas épocas e, a cada 25%, imprimir loss, perplexidade, a **reconstrução**
#    (o palpite do modelo para cada token do texto) e a **continuação** (o texto que ele gera a
#    partir dos primeiros tokens);
# 5. plotar as curvas e fazer os experimentos rápidos do fim.
#
# Roda em CPU em poucos segundos. O mesmo código é o script `scripts/01_train_nanogpt.py`
# (`uv run -m scripts.01_train_nanogpt --epochs=300`), pareado com este notebook pelo jupytext.

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

device = setup("01", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %% [markdown]
# ## Parâmetros
#
# Todos os hiperparâmetros ficam num dicionário. No notebook, edite a célula abaixo; no
# terminal, sobrescreva qualquer um com `--chave=valor` (`uv run -m scripts.01_train_nanogpt
# --help` lista todos). `--quick` é o modo rápido que os testes usam.
#
# | parâmetro | padrão | o que faz |
# |---|---|---|
# | `epochs` | 70 | passos de treino; cada passo vê o parágrafo inteiro (por isso "épocas", como no post) |
# | `lr` | 1e-3 | taxa de aprendizado do AdamW |
# | `weight_decay` | 1e-2 | puxa os pesos para zero (só matrizes e embeddings), freia o sobreajuste |
# | `betas` | (0,9; 0,95) | a "inércia" do AdamW: médias móveis do gradiente e do seu quadrado |
# | `cont_prefix_tokens` | 10 | quantos tokens iniciais o modelo recebe para gerar a continuação |
# | `n_layer`, `n_head`, `n_embd` | 4, 4, 128 | o tamanho do modelo (como no post) |
# | `dropout` | 0,2 | como no post: desliga 20% das ativações ao acaso durante o treino |
# | `tokenizer` | `char` | um token por caractere (offline); também `bytes`, `gpt2`, `hf:NOME` |
#
# O post usava `EPOCHS = 500` e `LR = 1e-4` com o tokenizador BPE do
# `pierreguillou/gpt2-small-portuguese` (cerca de 100 tokens). Aqui o padrão é um token por
# caractere (463 tokens e nada para baixar), e com uma taxa 10× maior 70 passos bastam para
# decorar o parágrafo em segundos. Com `--tokenizer=hf:pierreguillou/gpt2-small-portuguese
# --lr=1e-4 --epochs=500` você refaz o experimento original (precisa de internet).

# %%
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from nanomoe import GPT, get_tokenizer, gpt2_config, pick_precision
from nanomoe.course.overfit import (
    continue_text,
    overfit_sequence,
    read_text,
    reconstruct,
    run_overfit,
    set_cpu_threads,
    shift_targets,
)
from nanomoe.course.plots import plot_curves, plot_loss_ppl, save_figure
from nanomoe.training.cli import describe, parse_args

DEFAULTS = dict(
    text_file="paragrafo.txt",  # the paragraph shipped with nanomoe, or a path to any UTF-8 text file
    text_chars=0,  # keep only the first N characters of the file (0 = all)
    tokenizer="char",  # char | bytes | gpt2 | hf:NAME_OR_FOLDER
    epochs=70,
    lr=1e-3,
    weight_decay=1e-2,
    betas=(0.9, 0.95),
    cont_prefix_tokens=10,
    cont_new_tokens=0,  # tokens to generate at each checkpoint (0 = the rest of the text)
    n_layer=4,
    n_head=4,
    n_embd=128,
    dropout=0.2,
    bias=True,
    block_size=0,  # 0 = exactly the length of the text in tokens
    eval_every=5,  # measure the dropout-free loss every N steps (for the curves)
    seed=1337,
    device="auto",  # auto | cpu | cuda | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
    threads=0,  # CPU threads for torch (0 = automatic: fewer when the CPU is busy)
    out_dir="runs/01",
    exercises=False,  # also run the "experimentos rápidos" at the end (a few minutes on CPU)
    quick=False,  # tiny run for tests
)
QUICK = dict(epochs=12, eval_every=3, cont_new_tokens=40)
args = parse_args(DEFAULTS, quick=QUICK)
print(describe(args, DEFAULTS))

precision = pick_precision(args.device, args.dtype)  # prints the device and precision it chose
device = precision.device
if precision.device_type == "cpu":
    set_cpu_threads(args.threads)
torch.manual_seed(args.seed)
t_start = time.perf_counter()

# %% [markdown]
# ## 1. O texto e o tokenizador
#
# O parágrafo vem dentro do pacote (`nanomoe/resources/paragrafo.txt`, escrito para este curso). O
# tokenizador padrão dá um id para cada caractere distinto do texto, na ordem dos códigos Unicode
# (não é a ordem alfabética: o espaço vem primeiro, com id 0, as maiúsculas antes das minúsculas,
# 'U' tem id 7, e as letras acentuadas ficam no fim). O vocabulário é pequeno (algumas dezenas de
# símbolos) e tudo funciona offline. Compare com `--tokenizer=gpt2` (o BPE
# do GPT-2, 50 257 tokens): o mesmo parágrafo vira 187 tokens, e a loss inicial passa a ser
# ≈ ln 50 257 ≈ 10,8 (seção 4).

# %%
text = read_text(args.text_file, args.text_chars)
tok = get_tokenizer(args.tokenizer, text=text)
ids = torch.tensor([tok.encode(text)], dtype=torch.long, device=device)  # (1, T)
T, V = ids.size(1), tok.vocab_size
print(f"texto: {len(text)} caracteres -> {T} tokens | tokenizador {args.tokenizer!r}, vocabulário V = {V}")
print(text)
print("primeiros ids:", ids[0, :20].tolist())

# %% [markdown]
# ## 2. Alvos: o próximo token
#
# Um modelo de linguagem aprende a **prever o próximo token**. O alvo da posição `t` é o token
# `t+1`: basta deslocar a sequência uma casa para a esquerda. A última posição não tem próximo
# token; como no post, marcamos o alvo dela com `-1`, que a `cross_entropy` ignora
# (`ignore_index=-1`):
#
# ```python
# targets = ids.clone()
# targets[:, :-1] = ids[:, 1:]
# targets[:, -1] = -1   # ignora a última posição na loss
# ```
#
# É o mesmo que treinar com `x = ids[:, :-1]` e `y = ids[:, 1:]`; o truque do `-1` mantém `x`
# inteiro e apresenta o índice ignorado, que mais tarde serve para máscaras e *padding* (preenchimento).

# %%
targets = shift_targets(ids)
for t in range(6):
    nxt = "(ignorado)" if targets[0, t] < 0 else repr(tok.decode([targets[0, t].item()]))
    print(f"posição {t}: entrada {tok.decode(ids[0, : t + 1].tolist())!r:>10} -> alvo {nxt}")
print("...")
print(f"posição {T - 1}: alvo {targets[0, -1].item()} (ignorado: não há token depois do último)")

# %% [markdown]
# **Construa você mesmo:** o par (entrada, alvo) de um modelo de linguagem é a mesma sequência
# duas vezes, deslocada uma casa: `x` sem o último token, `y` sem o primeiro. Completando `y` com
# um `-1` no fim, ele fica do tamanho de `ids`, e deve sair idêntico aos `targets` que o pacote
# (`shift_targets`, em `nanomoe/course/overfit.py`) entrega ao laço de treino:

# %%
x, y = ids[:, :-1], ids[:, 1:]  # input: all but the last token; target: all but the first
my_targets = torch.cat([y, torch.full_like(ids[:, :1], -1)], dim=1)  # pad y with -1 to length T
assert torch.equal(my_targets, shift_targets(ids)) and torch.equal(my_targets, targets)
assert torch.equal(targets[:, :-1], y) and torch.equal(ids[:, :-1], x)
print(f"igual ao pacote: x e y têm {x.size(1)} tokens cada; targets = y + [-1], {T} posições")

# %% [markdown]
# ## 3. O modelo
#
# A configuração do post: 4 camadas, 4 cabeças de atenção, embeddings de 128 dimensões e
# dropout 0,2. A janela de contexto (`block_size`) precisa caber o texto inteiro, então ela é
# exatamente o número de tokens.

# %%
config = gpt2_config(
    vocab_size=V,
    block_size=args.block_size or T,
    n_layer=args.n_layer,
    n_head=args.n_head,
    n_embd=args.n_embd,
    dropout=args.dropout,
    bias=args.bias,
)
model = GPT(config).to(device)
shown = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
print("config:", {k: getattr(config, k) for k in shown})
print(f"parâmetros: {model.num_params(non_embedding=False):,} no total, "
      f"{model.num_params():,} sem a tabela de posições")

# %% [markdown]
# ## 4. Antes de treinar: loss ≈ ln(V), perplexidade ≈ V
#
# Com pesos aleatórios pequenos (o GPT-2 inicializa com desvio 0,02), os logits saem quase
# todos iguais e o softmax dá probabilidade ≈ 1/V a cada um dos V tokens. A entropia cruzada de
# acertar o token certo é então −ln(1/V) = **ln(V)**, e a perplexidade, exp(loss), é ≈ **V**:
# o modelo está "em dúvida" entre todos os tokens do vocabulário, como um dado de V faces.
# A perplexidade se lê como "entre quantos tokens o modelo hesita"; decorar o texto é chegar a 1.
#
# A **reconstrução** é o palpite (argmax) do modelo para cada token, dado o que vem antes (o
# primeiro token é copiado: nada vem antes dele). A **continuação** é o texto que ele gera
# sozinho, de forma gulosa (`temperature=0`: sempre o token mais provável, sem sorteio), a partir
# dos primeiros `cont_prefix_tokens` tokens. Aqui, antes do treino, geramos só 40 tokens novos
# (o post gerava 10); durante o treino, o resto do texto.
#
# Repare numa curiosidade: antes de treinar, a reconstrução parece o próprio texto atrasado
# uma posição ("UUm modelo..."), e a continuação repete o último caractere do prefixo, que é um
# espaço. Para que os 40 espaços não passem despercebidos, a célula mostra a continuação com `repr`
# (entre aspas) e conta quantos caracteres distintos ela tem. É o
# **compartilhamento de pesos**: a camada de saída usa a mesma matriz dos embeddings, então o
# logit do token `j` é o produto escalar do estado final com o embedding de `j`. No início esse
# estado ainda é quase o embedding do token de entrada, e o maior produto escalar é o dele
# consigo mesmo: o palpite "mais provável" é repetir a entrada. A vantagem é pequena (a loss fica
# só um pouco acima de ln V), mas basta para ganhar o argmax.

# %%
n_new = args.cont_new_tokens or None
model.eval()
with torch.no_grad():
    _, loss0 = model(ids, targets)
print(f"loss inicial {loss0.item():.4f} (ln V = {math.log(V):.4f}) | "
      f"perplexidade {math.exp(loss0.item()):.2f} (V = {V})")
print("[reconstrução]", tok.decode(reconstruct(model, ids).tolist()))
cont0 = tok.decode(continue_text(model, ids, args.cont_prefix_tokens, 40).tolist())
new0 = cont0[len(tok.decode(ids[0, : args.cont_prefix_tokens].tolist())):]  # only the generated part
print("[continuação] ", repr(cont0), f"| parte gerada: {len(set(new0))} caractere(s) distinto(s): {sorted(set(new0))}")
with torch.no_grad():  # probability the untrained model gives each correct next token (plotted in section 7)
    p_before = model(ids, targets)[0].softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()

# %% [markdown]
# **Construa você mesmo:** a entropia cruzada é só "−ln da probabilidade do token certo, em média".
# O log-softmax dos logits dá o ln da probabilidade de cada token do vocabulário em cada posição;
# pegamos a do alvo `y`, tiramos a média sobre as T − 1 posições (a última não tem alvo) e trocamos
# o sinal. A perplexidade é exp(loss). Os dois números devem bater com a loss que o
# `GPT.forward(ids, targets)` do pacote devolve (modo `eval`, sem dropout):

# %%
model.eval()
with torch.no_grad():
    logits, loss_pkg = model(ids, targets)  # (1, T, V) logits and the package's loss
logp = logits.float().log_softmax(dim=-1)  # ln p(token j | tokens up to t), for every t and j
logp_right = logp[:, :-1].gather(-1, y[..., None]).squeeze(-1)  # ln p of the right next token, (1, T-1)
my_loss = -logp_right.mean()
my_ppl = my_loss.exp()
torch.testing.assert_close(my_loss, loss_pkg)
torch.testing.assert_close(my_loss, loss0)
assert math.isclose(my_ppl.item(), math.exp(loss0.item()), rel_tol=1e-5)
print(f"igual ao pacote: loss {my_loss.item():.4f}, perplexidade {my_ppl.item():.2f} "
      f"(ln V = {math.log(V):.4f}, V = {V})")

# %% [markdown]
# ## 5. Treino
#
# O laço é o mais simples possível: a cada passo, o parágrafo inteiro entra no modelo, a loss
# é calculada sobre todas as posições, `backward()` e um passo do AdamW
# (`model.configure_optimizers`, com weight decay só nas matrizes). O código está em
# `nanomoe/course/overfit.py` (`overfit_sequence`).
#
# A loss "de treino" de cada passo é medida com dropout ligado, por isso oscila; a cada
# `eval_every` passos medimos também a loss sem dropout (modo `eval`), que é a que vale para
# a reconstrução e a geração.

# %%
def show(rep):
    print(f"\n=== Passo {rep.step:>4}/{args.epochs} | loss {rep.loss:.4f} | perplexidade {rep.ppl:.4f} "
          f"| loss de treino (com dropout) {rep.train_loss:.4f} | {rep.seconds:.1f}s ===")
    print(f"[reconstrução] ({rep.errors} de {T} tokens errados)")
    print(tok.decode(rep.reconstruction.tolist()))
    print(f"[continuação a partir de {args.cont_prefix_tokens} tokens]")
    print(tok.decode(rep.continuation.tolist()))


model.train()
result = overfit_sequence(
    model,
    ids,
    epochs=args.epochs,
    lr=args.lr,
    weight_decay=args.weight_decay,
    betas=args.betas,
    precision=precision,
    cont_prefix_tokens=args.cont_prefix_tokens,
    cont_new_tokens=n_new,
    eval_every=args.eval_every,
    on_report=show,
)

# %% [markdown]
# ## 6. Resumo

# %%
final = result.final
cont_exact = final.continuation.tolist()[: T] == ids[0].tolist() if n_new is None else None
print("\n=== Resumo ===")
print(f"loss final {final.loss:.4f} | perplexidade final {final.ppl:.4f} (inicial {math.exp(loss0.item()):.2f})")
print(f"reconstrução idêntica ao texto: {'sim' if final.exact else 'não'} ({final.errors} tokens errados de {T})")
if cont_exact is not None:
    print(f"continuação gulosa reescreve o texto inteiro: {'sim' if cont_exact else 'não'}")
for thr in (2.0, 1.5):
    step = result.first_ppl_below.get(thr)
    print(f"perplexidade < {thr}: {'no passo ' + str(step) if step else 'não atingida'}")
print(f"reconstrução exata desde o passo: {result.first_exact_step or '—'}")
print(f"tempo de treino {result.seconds:.1f}s ({result.seconds / args.epochs * 1000:.0f} ms/passo) | "
      f"tempo total {time.perf_counter() - t_start:.1f}s")

# %% [markdown]
# As saídas registradas neste notebook são de uma execução da configuração padrão numa CPU x86_64
# de 2 núcleos (PyTorch 2.15, 1 thread, com a CPU ocupada por outros processos: carga 2,6): 10,0 s
# de treino (142 ms/passo) e cerca de 18 s para executar todas as células. Numa GPU: não medido
# ainda.

# %% [markdown]
# ## 7. Curvas de loss e perplexidade
#
# As linhas tracejadas marcam o ponto de partida teórico: ln(V) para a loss e V para a
# perplexidade. A perplexidade está em escala logarítmica.

# %%
out_dir = Path(args.out_dir)
fig = plot_loss_ppl(result.history, vocab_size=V, target_ppl=1.5, title="Capítulo 01: decorando um parágrafo",
                    save_path=out_dir / "loss_ppl.png")
print(f"figura salva em {out_dir / 'loss_ppl.png'}")

# %% [markdown]
# E onde o modelo aprendeu? A probabilidade que ele dá ao token certo em cada posição do texto,
# antes e depois do treino. Antes, ≈ 1/V em quase toda parte (a linha tracejada); depois, ≈ 1 em
# quase toda parte. As posições que ficam abaixo são as que o modelo ainda confunde.

# %%
model.eval()
with torch.no_grad():
    p_after = model(ids, targets)[0].softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()
fig_p, ax = plt.subplots(figsize=(9, 3))
ax.plot(p_before.numpy(), lw=0.8, label="antes do treino")
ax.plot(p_after.numpy(), lw=0.8, label=f"depois de {args.epochs} passos")
ax.axhline(1 / V, color="gray", ls="--", lw=0.8, label=f"1/V = 1/{V}")
ax.set_yscale("log")
ax.set_xlabel("posição t (prevendo o token t+1)")
ax.set_ylabel("p(token certo)")
ax.set_title("Capítulo 01: probabilidade do próximo token, posição a posição")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
save_figure(fig_p, out_dir / "prob_por_posicao.png")
print(f"p(token certo): mediana {p_before.median():.3f} antes, {p_after.median():.3f} depois; "
      f"{int((p_after < 0.5).sum())} de {T - 1} posições abaixo de 0,5 depois do treino")

# %% [markdown]
# ## 8. Experimentos rápidos
#
# Os cinco experimentos do post. Cada um é uma flag do script (ou uma mudança nos `DEFAULTS`
# lá em cima); `--exercises` roda os quatro primeiros de uma vez (alguns minutos em CPU) e
# imprime as tabelas. Tente prever o resultado antes de abrir a resposta: os números nas
# respostas foram medidos com o parágrafo do curso, numa CPU de 2 núcleos.
#
# **1. Capacidade vs. velocidade.** Suba `n_embd` (32, 64, 128, 256) e meça em quantos passos
# a perplexidade fica abaixo de 2.
# `uv run -m scripts.01_train_nanogpt --n_embd=256`
#
# <details><summary>Resposta</summary>
#
# Medimos com `--exercises` (até 280 passos, parando quando a perplexidade sem dropout fica
# abaixo de 2; ela é medida a cada 5 passos; semente 1337; demais parâmetros padrão; a saída em
# `docs/results/01/exercicios.md`):
#
# | `n_embd` | parâmetros | passos até PPL < 2 | tempo (CPU de 2 núcleos compartilhada; varia com a carga) |
# |---|---|---|---|
# | 32 | 67 mil | 135 | 46,0 s |
# | 64 | 232 mil | 60 | 15,3 s |
# | 128 | 857 mil | 30 | 10,3 s |
# | 256 | 3,3 milhões | 35 | 26,4 s |
#
# Mais largura aprende em menos passos, até um ponto: com 256 o modelo não chega mais rápido
# (com a mesma taxa de aprendizado, modelos maiores costumam pedir uma taxa menor; e, com uma
# semente e a perplexidade medida a cada 5 passos, 30 e 35 passos são praticamente um empate) e
# cada passo custa cerca do dobro (2,2× nesta execução). O modelo de 67 mil parâmetros também
# chega lá, só que leva 4,5× mais passos.
#
# </details>
#
# **2. Dropout zero.** Compare a convergência com `--dropout=0`.
#
# <details><summary>Resposta</summary>
#
# Com `--dropout=0` (semente 1337): a perplexidade fica abaixo de 2 no mesmo passo 30, mas a
# reconstrução fica exata no passo 40 em vez de 52, a perplexidade final em 70 passos é 1,039 em
# vez de 1,058, e cada passo em CPU fica mais barato: o dropout sorteia máscaras e tira a atenção
# do caminho rápido do `scaled_dot_product_attention`. Na execução registrada em
# `docs/results/01/exercicios.md`, os 70 passos levaram 25,0 s com dropout e 18,4 s sem (1,4×).
# Em outra execução, alternando as duas configurações (70 passos cada, 1 thread, CPU de 2 núcleos
# compartilhada), medimos 244 contra 149 ms/passo na primeira rodada e 326 contra 174 na segunda
# (1,6× e 1,9×); na terceira a CPU ficou carregada por outros processos e as duas subiram para 860
# e 812 ms/passo. Tempo absoluto numa CPU compartilhada mede a carga; compare sempre lado a lado.
#
# O dropout desliga neurônios ao acaso justamente para o modelo **não** depender de detalhes
# decorados: é um regularizador contra o sobreajuste, e aqui o sobreajuste é o objetivo. Por
# isso ele atrasa a memorização (aqui, 12 passos numa semente só). Repare também que a loss de
# treino (com dropout) fica acima da loss medida em modo `eval`. Em um corpus de verdade, onde
# queremos generalizar, ele volta a ajudar.
#
# </details>
#
# **3. Prefixo curto.** Gere a continuação a partir de só 3 tokens: `--cont_prefix_tokens=3`.
# A geração se perde?
#
# <details><summary>Resposta</summary>
#
# Não se perde: com `--cont_prefix_tokens=3` o modelo recebe só "Um " e reescreve o parágrafo
# inteiro, sem erro. Mais curioso: demos a ele 8 caracteres do **meio** do texto ("s de mui")
# na posição 0, e ele continuou com "o de linguagem aprende como quem ouve histórias...", isto
# é, o texto a partir da posição 8, ignorando o que recebeu. Isso sugere que, com uma única
# sequência, o modelo aprendeu sobretudo "qual caractere vem na posição t", usando os embeddings de posição
# aprendidos, em vez de ler o conteúdo. A deriva aparece quando esse atalho não existe: textos
# maiores e variados, ou posições relativas (RoPE, capítulo 02).
#
# </details>
#
# **4. LR alto.** Rode com `--lr=5e-3` e observe as curvas.
#
# <details><summary>Resposta</summary>
#
# Com `--lr=5e-3` a loss de treino **sobe** logo no início (de 3,62 para 5,06 no passo 4), depois
# empaca num platô perto de 2,96 (20 passos a menos de 0,15 dele, contra 2 com `lr=1e-3`), e só
# então volta a cair: a perplexidade fica abaixo de 2 no passo 65 (contra 30), e em 70 passos a
# reconstrução ainda tem 65 erros (PPL 1,60; `docs/results/01/exercicios.md`). O
# platô tem explicação: 2,96 é a entropia das frequências dos caracteres do parágrafo (PPL ≈ 19).
# É a loss de um modelo que só sabe "quais letras são comuns" e ignora o contexto. Passos grandes
# demais derrubaram o modelo nessa solução preguiçosa (numa semente), e ele demorou a sair dela.
# Evitar esse tipo de tropeço no início é um dos motivos por que treinos de verdade começam com
# *warmup* (capítulo 02, seção "O laço de treino").
#
# </details>
#
# **5. Texto maior.** Use um texto de uns três parágrafos, por exemplo
# `--text_file=meu_texto.txt` (ou `--text_chars=1500` com um livro) e, se precisar, mais
# camadas (`--n_layer=6`).
#
# <details><summary>Resposta</summary>
#
# Usamos os primeiros 1 500 caracteres de *Dom Casmurro* (`--text_file=.../domCasmurro.txt
# --text_chars=1500`; V = 59, T = 1 500): três vezes mais tokens, e cada passo custou ~6× mais
# (a atenção cresce com T²). Em 70 passos, com 4 camadas: PPL 1,11 e 5 erros (quase lá). Com
# `--n_layer=6`: PPL 1,30 e 26 erros, e cada passo quase 2× mais caro. Aqui (uma semente), mais
# profundidade não acelerou a memorização; mais passos, sim: com `--epochs=120` e 4 camadas a reconstrução fica
# exata no passo 90 e a perplexidade final é 1,012 (6 minutos numa CPU de 2 núcleos compartilhada;
# numa GPU, não medido ainda).
#
# </details>

# %%
def experiment(label, **overrides):
    """This chapter's run with some parameters changed (nothing printed while it trains)."""
    kw = dict(
        tokenizer=args.tokenizer, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        dropout=args.dropout, bias=args.bias, seed=args.seed, precision=precision, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, betas=args.betas, cont_prefix_tokens=args.cont_prefix_tokens,
        eval_every=args.eval_every,
    )
    kw.update(overrides)
    m, _, _, res = run_overfit(text, **kw)
    ppl2, exact = res.first_ppl_below.get(2.0), res.first_exact_step
    print(f"  {label:<24} PPL < 2 no passo {ppl2 or '—':>4} | exata no passo {exact or '—':>4} | "
          f"PPL final {res.final.ppl:8.4f} | erros {res.final.errors:>3} | {res.seconds:5.1f}s")
    return m, res


if args.exercises:
    long_epochs = 4 * args.epochs
    print(f"1. capacidade vs. velocidade (até {long_epochs} passos; para quando PPL < 2)")
    for e in (32, 64, 128, 256):
        experiment(f"n_embd={e}", n_embd=e, epochs=long_epochs, stop_ppl=2.0)

    print("2. dropout")
    _, base = experiment(f"dropout={args.dropout:g} (padrão)")
    _, no_drop = experiment("dropout=0", dropout=0.0)

    print("3. prefixo curto")
    m3, short = experiment("cont_prefix_tokens=3", cont_prefix_tokens=3)
    print("  [a partir de 3 tokens]", tok.decode(short.final.continuation.tolist()))
    middle = ids[:, T // 2 : T // 2 + 8]  # 8 tokens from the middle of the text, now at position 0
    out = m3.generate(middle, 60, temperature=0.0)
    print(f"  [a partir de {tok.decode(middle[0].tolist())!r}, um trecho do meio do texto]",
          tok.decode(out[0].tolist()))

    print("4. lr alto")
    _, high = experiment("lr=5e-3", lr=5e-3)
    counts = torch.bincount(ids[0], minlength=V).float()
    p = counts[counts > 0] / T
    unigram = float(-(p * p.log()).sum())  # the loss of a model that only knows how often each token occurs
    print(f"  entropia das frequências dos tokens (prever sem olhar o contexto): {unigram:.3f}")
    for name, res in ((f"lr={args.lr:g}", base), ("lr=5e-3", high)):
        tl = [h["train_loss"] for h in res.history if "train_loss" in h]  # steps 1, 2, ...
        peak = max(range(len(tl)), key=tl.__getitem__)
        flat = sum(abs(v - unigram) < 0.15 for v in tl)
        print(f"  {name}: pico da loss de treino {tl[peak]:.2f} no passo {peak + 1} (inicial {tl[0]:.2f}); "
              f"{flat} passos com a loss a menos de 0.15 dessa entropia")
    fig_ex = plot_curves(
        {f"lr={args.lr:g}, dropout={args.dropout:g}": base.history, "lr=5e-3": high.history,
         "dropout=0": no_drop.history},
        y=("train_loss", "loss"), logy=True, title="Experimentos 2 e 4", save_path=out_dir / "experimentos.png",
    )

# %% [markdown]
# ## O que você aprendeu
#
# - Um modelo de linguagem prevê o **próximo token**: os alvos são a entrada deslocada uma casa, e a
#   última posição fica de fora (`-1`, ignorada pela `cross_entropy`).
# - Antes de treinar, loss ≈ ln V e perplexidade ≈ V: é o chute uniforme. Uma loss inicial muito
#   diferente disso indica um erro de inicialização ou de alvos.
# - Decorar um texto curto é o primeiro teste de qualquer modelo: se a loss não vai a ~0, algo está
#   quebrado antes de qualquer questão de escala.
# - Com pesos compartilhados entre entrada e saída, um modelo recém-inicializado tende a repetir a
#   entrada; o dropout atrasa a memorização (e deixa o passo mais caro); uma taxa de aprendizado
#   alta demais derruba o modelo num platô que ignora o contexto.
#
# **Para ler.** O código deste capítulo segue o [nanoGPT](https://github.com/karpathy/nanoGPT) de
# Andrej Karpathy. Artigos: Vaswani et al. 2017, [*Attention Is All You Need*](https://arxiv.org/abs/1706.03762)
# (o Transformer); Radford et al. 2019, [*Language Models are Unsupervised Multitask Learners*](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
# (o GPT-2; um relatório da OpenAI, sem versão no arXiv); Ba et al. 2016, [*Layer Normalization*](https://arxiv.org/abs/1607.06450);
# Hendrycks & Gimpel 2016, [*GELU*](https://arxiv.org/abs/1606.08415); Press & Wolf 2016,
# [*Using the Output Embedding to Improve Language Models*](https://arxiv.org/abs/1608.05859) (pesos
# compartilhados); Hinton et al. 2012, [*dropout*](https://arxiv.org/abs/1207.0580); Loshchilov &
# Hutter 2017, [*Decoupled Weight Decay Regularization*](https://arxiv.org/abs/1711.05101) (AdamW).
# Os termos do curso estão no [glossário](../docs/glossario.md).
#
# ## Próximo capítulo
#
# Decorar um parágrafo prova que as peças funcionam (dados, alvos, modelo, loss, otimizador,
# geração), mas não ensina o modelo a generalizar: ele não viu nada além deste texto. No
# capítulo 02 trocamos as peças do GPT-2 pelas de um LLM moderno (RoPE, RMSNorm, SwiGLU, GQA),
# uma de cada vez, e comparamos o efeito de cada uma treinando no corpus de Machado de Assis.
