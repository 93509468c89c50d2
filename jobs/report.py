"""Write report.html from a run's results: `python -m jobs.report [--config RUN.yaml]`."""
from pipeline.report import write_report
from pipeline.run import Run, parse_args, run_job


def stages(run: Run) -> int:
    run.stage = "report"
    print(write_report(run.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages, uses_ray=False)


if __name__ == "__main__":
    raise SystemExit(main())
