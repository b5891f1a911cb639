//! The `shoal.aggregator.v1.AggregatorService` query API.

use shoal_proto::aggregator::v1::aggregator_service_server::AggregatorService;
use shoal_proto::aggregator::v1::{ListSourcesRequest, ListSourcesResponse};
use tonic::{Request, Response, Status};

/// Answers queries about the fleet view.
#[derive(Debug, Clone)]
pub(crate) struct QueryService {
    pub(crate) aggregator_id: String,
}

#[tonic::async_trait]
impl AggregatorService for QueryService {
    async fn list_sources(&self, _request: Request<ListSourcesRequest>) -> Result<Response<ListSourcesResponse>, Status> {
        Ok(Response::new(ListSourcesResponse { sources: Vec::new(), aggregator_id: self.aggregator_id.clone() }))
    }
}
