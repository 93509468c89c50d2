"""Curate, train, evaluate and report every style: `python -m jobs.all_styles [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.evaluate import evaluate
from pipeline.report import write_report
from pipeline.run import Run, finish, parse_args, run_job
from pipeline.train import train_styles


def stages(run: Run) -> int:
    run.stage = "curate"
    curate_styles(run)
    run.stage = "train"
    trained = train_styles(run)
    run.stage = "evaluate"
    results = evaluate(run, trained)
    if results:
        run.written.append(results)
        run.stage = "report"
        run.written.append(write_report(run.dir))
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
