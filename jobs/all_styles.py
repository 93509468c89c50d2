"""Curate, train, evaluate, decide and report every style: `python -m jobs.all_styles [--config RUN.yaml] [--style NAME]`."""
from style_factory.run import Run, finish, parse_args, run_job


def stages(run: Run) -> int:
    # the stages load torch, Ray and the models: imported once the run and its models check out, so a wrong
    # config or a missing model fails in seconds
    from style_factory.curate import curate_styles
    from style_factory.decide import decide
    from style_factory.evaluate import evaluate
    from style_factory.report import write_report
    from style_factory.train import train_styles

    run.stage = "curate"
    curate_styles(run)
    run.stage = "train"
    trained = train_styles(run)
    run.stage = "evaluate"
    results = evaluate(run, trained)
    if results:
        run.written.append(results)
        run.stage = "decide"
        run.written.append(decide(run.dir, run.config.evaluate.selection))
        run.stage = "report"
        run.written.append(write_report(run.dir))
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
