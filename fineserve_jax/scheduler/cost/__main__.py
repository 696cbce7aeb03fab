"""`python -m fineserve_jax.scheduler.cost [CSV ...]`: fit the CSVs (default: the shared
FineServe profiles) and print every group's fit errors and the calibration between sources."""

import sys

from fineserve_jax.scheduler.cost.model import CostModel, format_fit_report


def main(argv) -> None:
    cm = CostModel.from_csv(argv) if argv else CostModel.from_profiles()
    print(format_fit_report(cm))
    for name, c in cm.calibration.items():
        print(f"calibration {name} -> {c['reference']}: prefill x{c['prefill_ratio']:.3f}, "
              f"decode x{c['decode_ratio']:.3f} over {c['common_groups']} common groups")


if __name__ == "__main__":
    main(sys.argv[1:])
