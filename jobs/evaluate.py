"""Sample and score the base model and every finished model, then name the best per style: `python -m jobs.evaluate [--config RUN.yaml] [--style NAME]`."""
from style_factory.run import Run, finish, parse_args, run_job


def stages(run: Run) -> int:
    # imported here, not at the top: see jobs/all_styles.py
    from style_factory.curate import curate_styles
    from style_factory.decide import decide
    from style_factory.evaluate import evaluate
    from style_factory.train import finished_models

    run.stage = "curate"
    curate_styles(run)  # reuses up-to-date curated data: the StyleRef images are the metric reference
    run.stage = "evaluate"
    results = evaluate(run, finished_models(run))
    if results:
        run.written.append(results)
        run.stage = "decide"
        run.written.append(decide(run.dir, run.config.evaluate.selection))
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
