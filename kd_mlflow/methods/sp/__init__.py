"""sp: similarity-preserving KD (Tung & Mori, ICCV 2019): the student's batch similarities
of last-stage activations match the teacher's."""

from __future__ import annotations

from ..spec import Mode, Param, at_least, feature_parameters


METHOD = Mode(
    "sp", "Similarity-preserving KD: CE plus the distance between row-normalised batch Gram matrices of the "
          "last-stage activations.", "distiller",
    # 3000: the paper's CIFAR-10 gamma, as the authors' and RepDistiller's recipe (-r 1 -a 0 -b 3000).
    feature_parameters(Param("sp_weight", "float", 3000.0, "sp: weight of the similarity-preserving term.",
                             at_least(0))),
    "kd_mlflow.methods.sp.distiller:SimilarityPreserving", terms=("ce", "sp"))
