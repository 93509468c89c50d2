"""Write best.parquet (the verdict, under the config's evaluate.selection) and report.html from a run's results: `python -m jobs.report [--config RUN.yaml]`."""
from style_factory.run import Run, parse_args, run_job


def stages(run: Run) -> int:
    # imported here, not at the top: see jobs/all_styles.py
    from style_factory.decide import decide
    from style_factory.report import write_report

    run.stage = "decide"
    print(decide(run.dir, run.config.evaluate.selection))
    run.stage = "report"
    print(write_report(run.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(__doc__, argv), stages, uses_ray=False)


if __name__ == "__main__":
    raise SystemExit(main())
