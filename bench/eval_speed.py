"""Evaluation speed, each figure a ratio against a baseline measured in the same run:

1. Questions/s of batched log-likelihood vs per-question generation on the same MC items (goal >= 5x
   with the project's own tokenizer), `--per-subject` questions from each subject: they share the
   subject's few-shot prefix, which log-likelihood computes once per subject. The generation baseline is a model that stops after its answer,
   as real ones do: the tiny random model never emits an end token, so left alone it always decodes
   all 10 tokens and overstates the speed-up; here its forward pass is wrapped so that, once the
   answer's tokens are out, the next token is the end token (`StopAfterAnswer`). `--never-stops` adds
   the never-stopping run, for comparison with older figures. Batched generation (same stopping) is the
   stronger baseline and is printed beside it, and so is log-likelihood with the prefix's KV cache copied
   to each row instead of shared-prefix attention (on a CPU). Forward passes and token slots (tokens run through the
   model, padding included) do not depend on how busy the machine is.
2. Open-ended judging: judgements/s of the scoring judge (AceGPT's 1-10 prompt, both positions) and of
   the pairwise judge at concurrency 16 vs 1, through the real code path (judge_scores /
   judge_pairwise -> EndpointClient) against the scripted OpenAI server with a fixed latency
   (default 1 s, a hosted judge writing a short verdict).

Each measurement runs `--repeats` times, interleaved, best kept.

    .venv/bin/python bench/eval_speed.py [--items 492] [--per-subject 246] [--shots 0,5] [--judge-latency 1.0]

The defaults have the shape of a full MMLU run: 246 questions per subject (its average) share each
subject's prefix, over two subjects. Fewer per subject (`--per-subject 16 --items 64`, a quick check)
understate the sharing: at 16 the 5-shot token slots of log-likelihood are a quarter of generation's,
at 246 a sixth, and the ratio follows them.

Without --model two tiny random Llamas are built in a temporary folder: one with dhad init-model's
tokenizer (the project's own), which has no " A" token, so each letter is a 2-token continuation; and
one whose tokenizer, like real ones, encodes " A".." D" as one token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dhad_trainer.evaluation.judging import EndpointScoreJudge  # noqa: E402
from dhad_trainer.evaluation.loaders import MMLU, EvalItem, load_suite  # noqa: E402
from dhad_trainer.evaluation.runner import HFModelRunner  # noqa: E402
from dhad_trainer.evaluation.scoring import GENERATE, LOGLIKELIHOOD, judge_pairwise, judge_scores, score_suite  # noqa: E402
from dhad_trainer.llm.judges import EndpointJudge  # noqa: E402
from dhad_trainer.llm.types import EndpointConfig  # noqa: E402
from tests.support.openai_server import OpenAIServer, Reply, prompt_of  # noqa: E402

BENCH = REPO / ".." / "shared" / "benchmarks" / "acegpt"


def tiny_model(out: Path, letters: bool, hidden: int = 64, layers: int = 2) -> str:
    """A tiny random Llama; `letters` adds AceGPT-style answer lines to its tokenizer corpus, so " A"
    .. " D" become one token each, as in real LLM tokenizers (Llama, Qwen, Jais)."""
    from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model

    corpus = DEFAULT_CORPUS
    if letters:
        corpus = out.with_suffix(".txt")
        extra = "".join(f"سؤال\nإجابة: {x}\n" for x in "ABCD") * 50
        corpus.write_text(DEFAULT_CORPUS.read_text(encoding="utf-8") + extra, encoding="utf-8")
    # 2048 positions: 5-shot prompts fit, as in real models
    return str(init_tiny_model(out, corpus_path=corpus, max_position=2048, hidden_size=hidden, num_layers=layers))


class StopAfterAnswer:
    """While active, a generating model emits its end token once `answer_tokens` tokens are out (the
    first ones are the model's own argmax). Prefill calls, and log-likelihood forwards, are untouched."""

    def __init__(self, model, eos: int, answer_tokens: int) -> None:
        self.eos, self.answer_tokens, self.active, self.width = eos, answer_tokens, False, 0
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self.active or ids is None:
            return output
        # a forward hook runs after the cache took this call's tokens: what was there before is the past
        past = (cache.get_seq_length() if cache is not None else 0) - ids.shape[1]
        if past <= 0:  # prefill: remember the prompt width
            self.width = ids.shape[1]
            return output
        if past - self.width + 1 >= self.answer_tokens:  # answer_tokens are out: end the answer
            logits = output.logits
            logits[..., :] = float("-inf")
            logits[..., self.eos] = 0.0
        return output


def measure(model_dir: str, shots: int, args: argparse.Namespace):
    base = HFModelRunner.from_pretrained(model_dir, device=args.device)
    items = load_suite(MMLU, args.benchmarks, limit=args.per_subject, limit_per="subject")[: args.items]
    dev = load_suite(MMLU, args.benchmarks, "dev") if shots else []
    calls: list[int] = []  # token slots (padding included) of each forward: compute, whatever the load
    base.model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].numel()), with_kwargs=True)
    letter_tokens = len(base.tok(" A", add_special_tokens=False)["input_ids"])
    stopper = StopAfterAnswer(base.model, base.tok.eos_token_id, letter_tokens)
    setups = {  # name: (method, batch, stops after its answer, runner options)
        "loglikelihood, batched": (LOGLIKELIHOOD, args.batch_size, False, {}),
        "loglikelihood, prefix KV copied": (LOGLIKELIHOOD, args.batch_size, False, {"split_attention": False}),
        "generate, per question": (GENERATE, 1, True, {}),
        "generate, batched": (GENERATE, args.batch_size, True, {}),
    }
    if args.never_stops:  # the old, unfair baseline, for comparison with earlier figures
        setups["generate, per question, never stops"] = (GENERATE, 1, False, {})
    best = dict.fromkeys(setups, float("inf"))
    forwards = {}
    for method, batch, stops, options in setups.values():  # warm-up
        stopper.active = stops
        score_suite(items[:2], HFModelRunner(base.model, base.tok, batch_size=batch, **options), method, dev=dev,
                    k_shot=1)
    for _ in range(args.repeats):
        for name, (method, batch, stops, options) in setups.items():
            runner = HFModelRunner(base.model, base.tok, batch_size=batch, **options)
            stopper.active = stops
            calls.clear()
            start = time.perf_counter()
            score_suite(items, runner, method, dev=dev, k_shot=shots)
            best[name] = min(best[name], time.perf_counter() - start)
            forwards[name] = (len(calls), sum(calls))
    stopper.active = False
    return {n: len(items) / t for n, t in best.items()}, forwards, f"{base.device}, ' A' = {letter_tokens} token(s)"


def judging(args: argparse.Namespace) -> None:
    items = [EvalItem("vicuna-80", str(i), f"سؤال مفتوح رقم {i} عن الثقافة العربية", None, None, "generic")
             for i in range(args.judge_questions)]
    answers = [f"إجابة النموذج عن السؤال {i}" for i in range(len(items))]
    refs = {it.id: f"إجابة المرجع عن السؤال {it.id}" for it in items}

    def reply(body: dict, attempt: int) -> Reply:
        """A consistent judge: the model's answer gets 8 and wins, whichever position it is shown in."""
        text = prompt_of(body)
        model_first = text.find("إجابة النموذج") < text.find("إجابة المرجع")
        scores, verdict = ("8 7", "A") if model_first else ("7 8", "B")
        return Reply(content=f"{scores}\nإجابة النموذج أوضح.\nالحكم: [[{verdict}]]")

    print(f"\njudging {len(items)} open-ended questions in both positions, judge latency {args.judge_latency:.2f} s, "
          f"best of {args.repeats}")
    for label, run_once in (
        ("judge-scores (1-10, AceGPT)", lambda url, c: judge_scores(
            items, answers, EndpointScoreJudge(EndpointConfig(base_url=url, model="j", max_concurrency=c),
                                               max_new_tokens=64, max_attempts=1), refs, runs=1)),
        ("judge-pairwise", lambda url, c: judge_pairwise(
            items, answers, EndpointJudge(EndpointConfig(base_url=url, model="j", max_concurrency=c),
                                          constitution="x", language="ar", max_new_tokens=64, max_attempts=1), refs)),
    ):
        rate = {}
        for c in (1, 16):
            best = float("inf")
            for _ in range(args.repeats):
                with OpenAIServer(api_key=None, script=reply, latency_s=args.judge_latency) as srv:
                    start = time.perf_counter()
                    result = run_once(srv.base_url, c)
                    best = min(best, time.perf_counter() - start)
                    assert result.flag is None and srv.peak_in_flight <= c, (result.flag, srv.peak_in_flight)
                    peak = srv.peak_in_flight
            rate[c] = 2 * len(items) / best
            print(f"  {label:<28} concurrency {c:>2}: {rate[c]:7.2f} judgements/s (peak in flight {peak})")
        print(f"  {label:<28} ratio concurrency 16 / 1: {rate[16] / rate[1]:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder; default: tiny random models (see --tokenizer)")
    ap.add_argument("--tokenizer", choices=["tiny", "letters", "both"], default="both",
                    help="tiny: dhad init-model's tokenizer; letters: one with single-token ' A'..' D'")
    ap.add_argument("--benchmarks", default=str(BENCH))
    ap.add_argument("--items", type=int, default=492, help="arabic-mmlu questions")
    ap.add_argument("--per-subject", type=int, default=246,
                    help="questions per subject (they share its few-shot prefix; a full run has 246 on average)")
    ap.add_argument("--shots", default="0,5", help="dev examples per prompt, comma-separated (AceGPT: 0 chat, 5 base)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden-size", type=int, default=256,
                    help="random model width: wide enough that a forward costs its tokens, as in real models, "
                         "rather than Python overhead (the 64-wide test model measures mostly overhead)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--judge-questions", type=int, default=16)
    ap.add_argument("--judge-latency", type=float, default=1.0, help="seconds per judge request")
    ap.add_argument("--never-stops", action="store_true", help="also time generation that never emits an end token")
    ap.add_argument("--skip", choices=["loglikelihood", "judging"], action="append", default=[])
    args = ap.parse_args()
    if "loglikelihood" not in args.skip:
        print(f"{args.items} arabic-mmlu questions ({args.per_subject} per subject), batch {args.batch_size}, "
              f"best of {args.repeats}")
        with tempfile.TemporaryDirectory() as tmp:
            if args.model:
                models = {args.model: args.model}
            else:
                kinds = ["tiny", "letters"] if args.tokenizer == "both" else [args.tokenizer]
                models = {
                    f"random Llama ({args.hidden_size} wide, {args.layers} layers), {k} tokenizer":
                        tiny_model(Path(tmp) / k, k == "letters", args.hidden_size, args.layers)
                    for k in kinds
                }
            for label, path in models.items():
                for shots in (int(k) for k in args.shots.split(",")):
                    qps, forwards, where = measure(path, shots, args)
                    print(f"{label}, {shots}-shot ({where})")
                    for name in qps:
                        n, slots = forwards[name]
                        print(f"  {name:<36} {qps[name]:8.1f} questions/s  {n:5d} forward passes  {slots:7d} token slots")
                    ll = qps["loglikelihood, batched"]
                    print(f"  ratio loglikelihood / per-question generation (stops after its answer): "
                          f"{ll / qps['generate, per question']:.1f}x (goal >= 5x)")
                    print(f"  ratio loglikelihood / batched generation (stops after its answer):      "
                          f"{ll / qps['generate, batched']:.1f}x")
                    print(f"  ratio loglikelihood / the same with the prefix KV copied per row:        "
                          f"{ll / qps['loglikelihood, prefix KV copied']:.2f}x")
    if "judging" not in args.skip:
        judging(args)


if __name__ == "__main__":
    main()
