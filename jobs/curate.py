"""Curate the styles into Parquet and a curation report: `python -m jobs.curate [--config RUN.yaml] [--style NAME]`."""
from style_factory.run import Run, finish, parse_args, run_job


def stages(run: Run) -> int:
    # imported here, not at the top: see jobs/all_styles.py
    from style_factory.curate import curate_styles

    run.stage = "curate"
    curate_styles(run)
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
