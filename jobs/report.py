"""Write report.html from a run's results: `python -m jobs.report [--config RUN.yaml]`."""
from pipeline.report import write_report
from pipeline.run import open_run, parse_args


def main(argv: list[str] | None = None) -> int:
    run = open_run(parse_args(__doc__, argv))
    print(write_report(run.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
