"""Train every style x method on curated data (curating first where needed):
`python -m jobs.train [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.run import finish, open_run, parse_args, start_ray
from pipeline.train import train_styles


def main(argv: list[str] | None = None) -> int:
    run = open_run(parse_args(__doc__, argv))
    start_ray()
    curate_styles(run)  # reuses up-to-date curated data; training is keyed by it
    train_styles(run)
    return finish(run)


if __name__ == "__main__":
    raise SystemExit(main())
