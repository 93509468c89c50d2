"""Sample and score the base model and every finished model: `python -m jobs.evaluate [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.evaluate import evaluate
from pipeline.run import Run, finish, parse_args, run_job
from pipeline.train import finished_models


def stages(run: Run) -> int:
    run.stage = "curate"
    curate_styles(run)  # reuses up-to-date curated data: the StyleRef images are the metric reference
    run.stage = "evaluate"
    results = evaluate(run, finished_models(run))
    if results:
        run.written.append(results)
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
