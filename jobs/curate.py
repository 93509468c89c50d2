"""Curate the styles into Parquet and a curation report: `python -m jobs.curate [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.run import finish, open_run, parse_args, start_ray


def main(argv: list[str] | None = None) -> int:
    run = open_run(parse_args(__doc__, argv))
    start_ray()
    curate_styles(run)
    return finish(run)


if __name__ == "__main__":
    raise SystemExit(main())
