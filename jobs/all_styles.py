"""Curate, train, evaluate and report every style: `python -m jobs.all_styles [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.evaluate import evaluate
from pipeline.report import write_report
from pipeline.run import finish, open_run, parse_args, start_ray
from pipeline.train import train_styles


def main(argv: list[str] | None = None) -> int:
    run = open_run(parse_args(__doc__, argv))
    start_ray()
    curate_styles(run)
    trained = train_styles(run)
    if evaluate(run, trained):
        write_report(run.dir)
    return finish(run)


if __name__ == "__main__":
    raise SystemExit(main())
