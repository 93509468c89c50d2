"""Curate the styles into Parquet and a curation report: `python -m jobs.curate [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.run import Run, finish, parse_args, run_job


def stages(run: Run) -> int:
    run.stage = "curate"
    curate_styles(run)
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
