from plpriv.metrics.fid import FID, ClassifierFeatures, inception_available, load_lightning_module
from plpriv.metrics.hessian import (
    EpsilonDenoiser,
    HessianScores,
    conditional_hessian_score,
    hessian_scores,
    log_density_hessian_eigs,
)
from plpriv.metrics.replication import ReplicationScore, SSCDFeatures, top1_cosine_similarity
from plpriv.metrics.idi import (
    IDIResult,
    infonce_mutual_information,
    information_difference_index,
    layer_mutual_information,
)
