"""Train every style x method on curated data (curating first where needed):
`python -m jobs.train [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.run import Run, finish, parse_args, run_job
from pipeline.train import train_styles


def stages(run: Run) -> int:
    run.stage = "curate"
    curate_styles(run)  # reuses up-to-date curated data; training is keyed by it
    run.stage = "train"
    train_styles(run)
    return finish(run)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages)


if __name__ == "__main__":
    raise SystemExit(main())
