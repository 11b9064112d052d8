"""Majority-label floors of the benchmark streams (no model needed): petmix.floors on each seed's training
sample, scored on the test set of test seed 0, as `petmix compare --seeds 0,1,2` computes them.

Usage: python benchmarks/majority_floors.py [DATA_DIR]   (default ../shared/data/CL_Benchmark)
"""
import sys

from petmix.data.loaders import load_tasks
from petmix.data.streams import resolve_stream
from petmix.floors import majority_floor
from petmix.stats import Summary

D = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/CL_Benchmark"
SUPERNI5 = ["task363_sst2_polarity_classification", "task181_outcome_extraction",
            "task073_commonsenseqa_answer_generation", "task591_sciq_answer_generation", "task875_emotion_classification"]
for name, specs, max_train, max_test in [("attempt-targets k=32, 24 test", resolve_stream("attempt-targets"), 32, 24),
                                         ("attempt-targets k=32, 100 test", resolve_stream("attempt-targets"), 32, 100),
                                         ("superni5 (cl_superni.sh), 100 test", SUPERNI5, 96, 100),
                                         ("long4-avail-order1 (cl_long.sh), 100 test", resolve_stream("long4-avail-order1"), 96, 100)]:
    floors = [majority_floor(load_tasks(specs, D, max_train=max_train, max_test=max_test, seed=s, test_seed=0)) for s in (0, 1, 2)]
    print(f"\n{name}: majority-label floor over seeds 0,1,2 (train sample per seed, test seed 0)")
    for t in floors[0]["tasks"]:
        pt = [f["per_task"][t] for f in floors]
        print(f"  {t}: {Summary.of([p['score'] for p in pt]).cell()}  answers {sorted({p['answer'] for p in pt})}  "
              f"classification={pt[0]['classification']} n_test={pt[0]['n_test']}")
    print(f"  AP: {Summary.of([f['metrics']['AP'] for f in floors]).cell()}")
sys.stdout.flush()
