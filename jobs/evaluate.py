"""Sample and score the base model and every finished model: `python -m jobs.evaluate [--config RUN.yaml] [--style NAME]`."""
from pipeline.curate import curate_styles
from pipeline.evaluate import evaluate
from pipeline.run import finish, open_run, parse_args, start_ray
from pipeline.train import finished_models


def main(argv: list[str] | None = None) -> int:
    run = open_run(parse_args(__doc__, argv))
    start_ray()
    curate_styles(run)  # reuses up-to-date curated data: the StyleRef images are the metric reference
    evaluate(run, finished_models(run))
    return finish(run)


if __name__ == "__main__":
    raise SystemExit(main())
